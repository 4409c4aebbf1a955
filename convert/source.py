"""Read a local diffusers Stable Diffusion folder: check its layout, detect the family, and
collect the numbers the bundle manifest needs. Pure JSON reading, no torch.

Family rules (first that applies):

1. SDXL markers (``text_encoder_2``, ``addition_embed_type == "text_time"``, an ``XL`` pipeline
   class) -> reserved, not implemented: UserError.
2. The component classes must be ``UNet2DConditionModel`` / ``CLIPTextModel`` / ``AutoencoderKL``
   with a 4-channel latent UNet (not inpainting), and the UNet's ``cross_attention_dim`` must equal
   the text encoder's ``hidden_size``; otherwise the family is unknown: UserError.
3. Text width 768 -> ``sd1`` (CLIP ViT-L/14); 1024 -> ``sd2`` (OpenCLIP ViT-H/14).
4. Any other width (miniature models): ``sd2`` when the scheduler predicts ``v_prediction`` or the
   UNet uses linear projections / a ``gelu`` text encoder (the SD 2.x layout), else ``sd1``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from zo_runtime.errors import UserError

REQUIRED = ("unet", "text_encoder", "vae", "tokenizer", "scheduler")
SD_PIPELINES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "OnnxStableDiffusionPipeline",
                "StableDiffusionPipelineSafe", "AltDiffusionPipeline"}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors",
                "pytorch_model.bin", "diffusion_pytorch_model.safetensors.index.json",
                "model.safetensors.index.json", "pytorch_model.bin.index.json",
                "diffusion_pytorch_model.bin.index.json")


@dataclass
class SourceInfo:
    path: Path
    pipeline_class: str
    family: str
    model_index: dict
    unet: dict
    vae: dict
    text_encoder: dict
    scheduler: dict
    tokenizer_config: dict = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.get("block_out_channels", [128, 256, 512, 512])) - 1)

    @property
    def resolution(self) -> int:
        s = self.unet.get("sample_size", 64)
        s = s[0] if isinstance(s, (list, tuple)) else s
        return int(s) * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return int(self.vae.get("latent_channels", 4))

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.get("scaling_factor", 0.18215))

    @property
    def embedding_dim(self) -> int:
        return int(self.text_encoder["hidden_size"])

    @property
    def max_length(self) -> int:
        n = int(self.text_encoder.get("max_position_embeddings", 77))
        m = self.tokenizer_config.get("model_max_length")
        if isinstance(m, (int, float)) and 0 < m < n:
            n = int(m)
        return n

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.get("prediction_type", "epsilon"))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.get("num_train_timesteps", 1000))

    @property
    def noise_schedule(self) -> dict:
        s = self.scheduler
        out = {"num_train_timesteps": self.num_train_timesteps,
               "beta_schedule": s.get("beta_schedule", "linear"),
               "beta_start": float(s.get("beta_start", 0.0001)),
               "beta_end": float(s.get("beta_end", 0.02))}
        for k in ("trained_betas", "rescale_betas_zero_snr", "timestep_spacing", "steps_offset",
                  "set_alpha_to_one", "clip_sample"):
            if k in s:
                out[k] = s[k]
        out["scheduler_class"] = s.get("_class_name")
        return out

    def alphas_cumprod(self):
        """The training schedule's cumulative alphas (numpy float64, length num_train_timesteps)."""
        import numpy as np
        ns = self.noise_schedule
        n = ns["num_train_timesteps"]
        if ns.get("trained_betas"):
            betas = np.asarray(ns["trained_betas"], np.float64)
        elif ns["beta_schedule"] == "scaled_linear":
            betas = np.linspace(ns["beta_start"] ** 0.5, ns["beta_end"] ** 0.5, n, dtype=np.float64) ** 2
        elif ns["beta_schedule"] == "linear":
            betas = np.linspace(ns["beta_start"], ns["beta_end"], n, dtype=np.float64)
        elif ns["beta_schedule"] == "squaredcos_cap_v2":
            f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
            t = np.arange(n, dtype=np.float64)
            betas = np.minimum(1 - f((t + 1) / n) / f(t / n), 0.999)
        else:
            raise UserError(f"unsupported beta_schedule {ns['beta_schedule']!r} in the scheduler config")
        return np.cumprod(1.0 - betas)


def _read_json(p: Path, what: str) -> dict:
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"{what}: {p} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what}: {p} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None


def _component_class(model_index: dict, name: str) -> str | None:
    v = model_index.get(name)
    if isinstance(v, (list, tuple)) and len(v) == 2 and v[1]:
        return str(v[1])
    return None


def inspect_source(src: str | Path) -> SourceInfo:
    """Validate ``src`` as a diffusers SD1.x/SD2.x folder and return what the converter needs.

    Raises UserError (one line) for: a missing folder, a folder without model_index.json, a missing
    component, or a family that is unknown or not implemented (SDXL).
    """
    p = Path(src).expanduser()
    if not p.exists():
        raise UserError(f"source folder {p} does not exist")
    if not p.is_dir():
        raise UserError(f"source {p} is not a folder (expected a diffusers Stable Diffusion folder)")
    if not (p / "model_index.json").is_file():
        raise UserError(f"{p} is not a diffusers pipeline folder: model_index.json is missing")
    mi = _read_json(p / "model_index.json", "model_index")
    if not isinstance(mi, dict):
        raise UserError(f"{p / 'model_index.json'} is not a JSON object")
    cls = str(mi.get("_class_name", ""))
    if "text_encoder_2" in mi or "XL" in cls:
        raise UserError(f"{cls or 'this pipeline'} looks like SDXL, which is not supported yet (sd1 and sd2 only)")
    for comp in REQUIRED:
        if _component_class(mi, comp) is None:
            raise UserError(f"{p} is not a Stable Diffusion pipeline: model_index.json has no {comp!r} component")
        if not (p / comp).is_dir():
            raise UserError(f"component folder {comp}/ is missing in {p}")
    for comp in ("unet", "text_encoder", "vae"):
        cfg = p / comp / "config.json"
        if not cfg.is_file():
            raise UserError(f"component {comp}: {cfg} is missing")
        if not any((p / comp / w).is_file() for w in WEIGHT_FILES):
            raise UserError(f"component {comp}: no weights file in {p / comp}")
    if not (p / "scheduler" / "scheduler_config.json").is_file():
        raise UserError(f"component scheduler: {p / 'scheduler' / 'scheduler_config.json'} is missing")
    tok = p / "tokenizer"
    if not ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()) and not (tok / "tokenizer.json").is_file():
        raise UserError(f"component tokenizer: {tok} has neither vocab.json + merges.txt nor tokenizer.json")

    unet = _read_json(p / "unet" / "config.json", "unet config")
    vae = _read_json(p / "vae" / "config.json", "vae config")
    te = _read_json(p / "text_encoder" / "config.json", "text_encoder config")
    sched = _read_json(p / "scheduler" / "scheduler_config.json", "scheduler config")
    tok_cfg = _read_json(tok / "tokenizer_config.json", "tokenizer config") if (tok / "tokenizer_config.json").is_file() else {}

    info = SourceInfo(path=p.resolve(), pipeline_class=cls, family="", model_index=mi, unet=unet, vae=vae,
                      text_encoder=te, scheduler=sched, tokenizer_config=tok_cfg)
    info.family = detect_family(info)
    return info


def detect_family(info: SourceInfo) -> str:
    """``sd1`` or ``sd2``; UserError for anything else (see the module docstring for the rules)."""
    mi, unet, te = info.model_index, info.unet, info.text_encoder
    if unet.get("addition_embed_type") == "text_time":
        raise UserError("the UNet takes SDXL time ids (addition_embed_type=text_time): SDXL is not supported yet")
    classes = {c: _component_class(mi, c) for c in ("unet", "text_encoder", "vae")}
    expected = {"unet": "UNet2DConditionModel", "text_encoder": "CLIPTextModel", "vae": "AutoencoderKL"}
    for comp, want in expected.items():
        if classes[comp] != want:
            raise UserError(f"unknown model family: {comp} is {classes[comp]}, expected {want}")
    if info.pipeline_class and info.pipeline_class not in SD_PIPELINES:
        raise UserError(f"unknown model family: pipeline class {info.pipeline_class} (supported: StableDiffusionPipeline)")
    if int(unet.get("in_channels", 4)) != info.latent_channels or int(unet.get("out_channels", 4)) != info.latent_channels:
        raise UserError(f"unknown model family: UNet has {unet.get('in_channels')} input channels for "
                        f"{info.latent_channels} latent channels (inpainting and depth models are not supported)")
    width = te.get("hidden_size")
    cross = unet.get("cross_attention_dim")
    if isinstance(cross, (list, tuple)):
        cross = cross[0] if len(set(cross)) == 1 else None
    if not isinstance(width, int) or cross != width:
        raise UserError(f"unknown model family: UNet cross_attention_dim {unet.get('cross_attention_dim')} "
                        f"does not match the text encoder width {width}")
    if info.prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(f"unknown model family: prediction_type {info.prediction_type!r}")
    if width == 768:
        return "sd1"
    if width == 1024:
        return "sd2"
    sd2_like = (info.prediction_type == "v_prediction" or bool(unet.get("use_linear_projection"))
                or te.get("hidden_act") == "gelu")
    return "sd2" if sd2_like else "sd1"
