"""Stable Diffusion XL pipelines built from configs with random weights (no download).

``tiny``: what the tests use - a two-level UNet with ``addition_embed_type="text_time"``, a
CLIP-L-like text encoder of width 32 and an OpenCLIP-bigG-like one of width 48 with projection
(different widths, so a swapped encoder cannot pass), 16 px images, 8x8 latents.
``sdxl``: the shapes of stabilityai/stable-diffusion-xl-base-1.0 (UNet 2.57 B parameters, CLIP-L
768, bigG 1280, VAE scaling factor 0.13025, Euler scheduler) for ``benchmarks/bench_sdxl.py``.
The tokenizers are the real 49,408-token CLIP vocabulary (``clip_vocab``); ``tokenizer_2`` pads
with ``!`` as SDXL's does.

    >>> build_sdxl_pipeline("/tmp/tiny_sdxl", size="tiny", seed=0)
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from zo_edge.models.clip_vocab import write_clip_tokenizer

SIZES = ("tiny", "sdxl")


def unet_config(size: str) -> dict:
    if size == "tiny":
        return dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                    transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=48 + 6 * 8,
                    cross_attention_dim=32 + 48, norm_num_groups=16)
    return dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=256, transformer_layers_per_block=(1, 2, 10),
                projection_class_embeddings_input_dim=2816, cross_attention_dim=2048, norm_num_groups=32)


def vae_config(size: str) -> dict:
    common = dict(in_channels=3, out_channels=3, latent_channels=4, scaling_factor=0.13025, force_upcast=True)
    if size == "tiny":
        return dict(common, block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16, layers_per_block=1, norm_num_groups=32)
    return dict(common, block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, layers_per_block=2)


def text_configs(size: str) -> tuple[dict, dict]:
    """(CLIP-L, OpenCLIP bigG) configs; token ids as in SDXL's own config files (eos 2: pooling at argmax)."""
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    if size == "tiny":
        return (dict(common, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
                     projection_dim=32, hidden_act="quick_gelu"),
                dict(common, hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=3,
                     projection_dim=48, hidden_act="gelu"))
    return (dict(common, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 projection_dim=768, hidden_act="quick_gelu"),
            dict(common, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                 projection_dim=1280, hidden_act="gelu"))


def build_sdxl_pipeline(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """A random-weight StableDiffusionXLPipeline saved as a diffusers folder (deterministic per seed)."""
    if size not in SIZES:
        raise ValueError(f"size {size!r}: one of {SIZES}")
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    if size == "sdxl":
        return _build_one_at_a_time(Path(out_dir), seed)
    l_cfg, g_cfg = text_configs(size)
    text_encoder = CLIPTextModel(CLIPTextConfig(**l_cfg))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**g_cfg))
    vae = AutoencoderKL(**vae_config(size))
    unet = UNet2DConditionModel(**unet_config(size))
    with tempfile.TemporaryDirectory() as td:
        write_clip_tokenizer(td)
        tokenizer = CLIPTokenizer.from_pretrained(td, model_max_length=77)
        tokenizer_2 = CLIPTokenizer.from_pretrained(td, model_max_length=77, pad_token="!")
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                       interpolation_type="linear", use_karras_sigmas=False, prediction_type="epsilon")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    out = Path(out_dir)
    pipe.save_pretrained(out)
    return out


MODEL_INDEX = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.35.2",
               "feature_extractor": [None, None], "force_zeros_for_empty_prompt": True, "image_encoder": [None, None],
               "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
               "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
               "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def _build_one_at_a_time(out: Path, seed: int) -> Path:
    """The full-size pipeline, one component built, saved (FP32 safetensors, as SDXL base's own
    files) and freed at a time: peak memory is the UNet's 10.3 GB, not the pipeline's 14 GB."""
    import gc
    import json

    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out.mkdir(parents=True, exist_ok=True)
    l_cfg, g_cfg = text_configs("sdxl")
    builders = (("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**l_cfg))),
                ("text_encoder_2", lambda: CLIPTextModelWithProjection(CLIPTextConfig(**g_cfg))),
                ("vae", lambda: AutoencoderKL(**vae_config("sdxl"))),
                ("unet", lambda: UNet2DConditionModel(**unet_config("sdxl"))))
    for k, (name, build) in enumerate(builders):
        torch.manual_seed(seed + k)
        model = build()
        model.save_pretrained(out / name, safe_serialization=True, max_shard_size="20GB")
        del model
        gc.collect()
    with tempfile.TemporaryDirectory() as td:
        write_clip_tokenizer(td)
        CLIPTokenizer.from_pretrained(td, model_max_length=77).save_pretrained(out / "tokenizer")
        CLIPTokenizer.from_pretrained(td, model_max_length=77, pad_token="!").save_pretrained(out / "tokenizer_2")
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                           steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
                           use_karras_sigmas=False, prediction_type="epsilon").save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return out
