"""ControlNet (edges) with Stable Diffusion 1.5, timed without and with AgentSD.

    python examples/controlnet.py house.jpg --prompt "a cosy wooden cabin in the snow" --out cabin

The edge map of the input image guides the layout. AgentSD patches the UNet's self-attention; the
ControlNet runs unchanged beside it (diffusers adds its residuals to the patched UNet as usual).
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image, ImageFilter, ImageOps

import agentsd


def edge_map(image: Image.Image, threshold: int = 32) -> Image.Image:
    """White edges on black, the kind of control image a canny ControlNet expects (no OpenCV needed)."""
    edges = ImageOps.grayscale(image).filter(ImageFilter.SMOOTH).filter(ImageFilter.FIND_EDGES)
    return edges.point(lambda v: 255 if v > threshold else 0).convert("RGB")


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
    parser.add_argument("image", help="image whose edges guide the layout")
    parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                        help="hub id or local folder")
    parser.add_argument("--controlnet", default="lllyasviel/sd-controlnet-canny", help="hub id or folder")
    parser.add_argument("--prompt", default="a cosy wooden cabin in the snow, photo")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=512, help="the control image is resized to this square")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="controlnet", help="prefix of the output PNG files")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    controlnet = ControlNetModel.from_pretrained(args.controlnet, torch_dtype=dtype)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        args.model, controlnet=controlnet, torch_dtype=dtype
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    control = edge_map(Image.open(args.image).convert("RGB").resize((args.size, args.size)))
    settings = dict(prompt=args.prompt, image=control, height=args.size, width=args.size)

    timed(pipe, args.seed, num_inference_steps=2, **settings)  # warm-up
    original, seconds_original = timed(pipe, args.seed, num_inference_steps=args.steps, **settings)

    agentsd.apply_patch(pipe, seed=args.seed)
    timed(pipe, args.seed, num_inference_steps=2, **settings)
    patched, seconds_patched = timed(pipe, args.seed, num_inference_steps=args.steps, **settings)
    agentsd.remove_patch(pipe)

    control.save(f"{args.out}-edges.png")
    original.save(f"{args.out}-original.png")
    patched.save(f"{args.out}-agentsd.png")
    print(f"original {seconds_original:.2f} s, AgentSD {seconds_patched:.2f} s "
          f"({seconds_original / seconds_patched:.2f}x) at {args.size}x{args.size}, {args.steps} steps")


if __name__ == "__main__":
    main()
