"""Test support: Stable Diffusion pipelines built from configs with random weights (no download).

Used by the tests (``tiny``: a few hundred thousand UNet parameters, 16 px images, 8x8 latents)
and by ``benchmarks/bench_convert.py`` (``sd15``: the SD1.5 shapes, 1.07 B parameters, 4 GB).
The CLIP tokenizer is the real 49,408-token vocabulary written by :mod:`zo_edge.models.clip_vocab`.
Needs the ``convert`` extra (torch, diffusers, transformers).

    >>> build_pipeline("/tmp/tiny_sd1", family="sd1", size="tiny", seed=0)
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from zo_edge.models.clip_vocab import write_clip_tokenizer

SIZES = ("tiny", "mid", "sd15")
FAMILIES = ("sd1", "sd2")


def _unet_config(family: str, size: str) -> dict:
    if size == "tiny":
        cfg = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                   cross_attention_dim=32, norm_num_groups=32)
        if family == "sd2":
            cfg.update(attention_head_dim=(4, 8), use_linear_projection=True, upcast_attention=True)
        else:
            cfg.update(attention_head_dim=8)
        return cfg
    if size == "mid":
        # the top two SD1.5 levels (320 / 640 channels, 8 heads of 40 / 80, cross-attention width 768)
        # at SD1.5's latent size: the attention at 64x64 latents dominates, as in the real UNet
        cfg = dict(sample_size=64, block_out_channels=(320, 640), layers_per_block=1,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768, attention_head_dim=8)
        if family == "sd2":
            cfg.update(cross_attention_dim=1024, attention_head_dim=(5, 10), use_linear_projection=True)
        return cfg
    # SD1.5 / SD2.x shapes; everything else is UNet2DConditionModel's default (the SD1.x layout).
    if family == "sd2":
        return dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                    use_linear_projection=True, upcast_attention=True)
    return dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


def _vae_config(size: str) -> dict:
    if size == "tiny":
        # two blocks: scale factor 2, 16 px images -> 8x8 latents
        return dict(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                    latent_channels=4, sample_size=16, layers_per_block=1, norm_num_groups=32)
    if size == "mid":  # SD's 8x downsampling with narrow channels
        return dict(in_channels=3, out_channels=3, block_out_channels=(32, 64, 64, 64),
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    latent_channels=4, sample_size=512, layers_per_block=1, norm_num_groups=32)
    return dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=4, sample_size=512, layers_per_block=2)


def _text_config(family: str, size: str) -> dict:
    act = "gelu" if family == "sd2" else "quick_gelu"
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                  pad_token_id=49407, hidden_act=act)
    if size == "tiny":
        return dict(common, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                    projection_dim=32)
    if size == "mid":  # full width (it sets the cross-attention width), 2 layers
        width = 1024 if family == "sd2" else 768
        return dict(common, hidden_size=width, intermediate_size=4 * width, num_attention_heads=width // 64,
                    num_hidden_layers=2, projection_dim=width)
    if family == "sd2":
        return dict(common, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                    num_hidden_layers=23, projection_dim=512)
    return dict(common, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                projection_dim=768)


def build_pipeline(out_dir: str | Path, family: str = "sd1", size: str = "tiny", seed: int = 0) -> Path:
    """Build a random-weight Stable Diffusion pipeline and save it as a diffusers folder.

    ``family``: ``sd1`` (epsilon, PNDM scheduler, quick_gelu CLIP) or ``sd2`` (v_prediction, DDIM,
    gelu text encoder, linear-projection transformer blocks). ``size``: ``tiny``, ``mid`` (SD1.5's two top UNet levels at 64x64 latents, narrow VAE, 2-layer CLIP-L
    width text encoder) or ``sd15`` (full SD1.5 / SD2 shapes).
    Deterministic for a given seed. Returns ``out_dir``.
    """
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: one of {FAMILIES}")
    if size not in SIZES:
        raise ValueError(f"size {size!r}: one of {SIZES}")
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**_unet_config(family, size))
    vae = AutoencoderKL(**_vae_config(size))
    text_encoder = CLIPTextModel(CLIPTextConfig(**_text_config(family, size)))
    with tempfile.TemporaryDirectory() as td:
        write_clip_tokenizer(td)
        tokenizer = CLIPTokenizer.from_pretrained(td, model_max_length=77)
    sched = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1, set_alpha_to_one=False)
    if family == "sd2":
        scheduler = DDIMScheduler(clip_sample=False, prediction_type="v_prediction", **sched)
    else:
        scheduler = PNDMScheduler(skip_prk_steps=True, prediction_type="epsilon", **sched)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out = Path(out_dir)
    pipe.save_pretrained(out)
    return out
