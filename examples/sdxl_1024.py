"""SDXL at 1024x1024, timed without and with AgentSD.

    python examples/sdxl_1024.py --prompt "an astronaut riding a horse, photo" --out astronaut

SDXL's highest-resolution level has no attention, so AgentSD patches the next one (downsample 2,
64x64 tokens at 1024 px): ``max_downsample=None`` finds it. Expect the gain to grow with resolution.
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import AutoPipelineForText2Image

import agentsd


def timed(pipe, seed: int, **kwargs):
    """One image and the seconds it took (waiting for the GPU, so the time is honest)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    image = pipe(generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return image, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="stabilityai/stable-diffusion-xl-base-1.0",
                        help="hub id or local folder")
    parser.add_argument("--prompt", default="an astronaut riding a horse on the moon, photo")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=1024, help="height and width in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="sdxl", help="prefix of the two PNG files")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = AutoPipelineForText2Image.from_pretrained(args.model, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    settings = dict(prompt=args.prompt, height=args.size, width=args.size)

    timed(pipe, args.seed, num_inference_steps=2, **settings)  # warm-up
    original, seconds_original = timed(pipe, args.seed, num_inference_steps=args.steps, **settings)

    agentsd.apply_patch(pipe, seed=args.seed)
    print(f"patched {len(agentsd.patch_targets(pipe))} self-attention layers of {type(pipe).__name__}")
    timed(pipe, args.seed, num_inference_steps=2, **settings)
    patched, seconds_patched = timed(pipe, args.seed, num_inference_steps=args.steps, **settings)
    agentsd.remove_patch(pipe)

    original.save(f"{args.out}-original.png")
    patched.save(f"{args.out}-agentsd.png")
    print(f"original {seconds_original:.2f} s, AgentSD {seconds_patched:.2f} s "
          f"({seconds_original / seconds_patched:.2f}x) at {args.size}x{args.size}, {args.steps} steps")


if __name__ == "__main__":
    main()
