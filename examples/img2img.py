"""Image-to-image with Stable Diffusion, timed without and with AgentSD.

    python examples/img2img.py sketch.png --prompt "a fantasy landscape, trending on artstation" --out fantasy

Only ``strength * steps`` steps run; AgentSD's schedule follows their position in the full schedule.
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import AutoPipelineForImage2Image
from PIL import Image

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
    parser.add_argument("init_image", help="the starting image (any format Pillow reads)")
    parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                        help="hub id or local folder")
    parser.add_argument("--prompt", default="a fantasy landscape, trending on artstation")
    parser.add_argument("--strength", type=float, default=0.75, help="how much to repaint, in (0, 1]")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512, help="the init image is resized to this square")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="img2img", help="prefix of the two PNG files")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = AutoPipelineForImage2Image.from_pretrained(args.model, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    init = Image.open(args.init_image).convert("RGB").resize((args.size, args.size))
    settings = dict(prompt=args.prompt, image=init, strength=args.strength)
    warm_up = max(2, round(2 / args.strength))  # at least one step after strength cuts the schedule

    timed(pipe, args.seed, num_inference_steps=warm_up, **settings)
    original, seconds_original = timed(pipe, args.seed, num_inference_steps=args.steps, **settings)

    agentsd.apply_patch(pipe, seed=args.seed)
    timed(pipe, args.seed, num_inference_steps=warm_up, **settings)
    patched, seconds_patched = timed(pipe, args.seed, num_inference_steps=args.steps, **settings)
    agentsd.remove_patch(pipe)

    original.save(f"{args.out}-original.png")
    patched.save(f"{args.out}-agentsd.png")
    print(f"original {seconds_original:.2f} s, AgentSD {seconds_patched:.2f} s "
          f"({seconds_original / seconds_patched:.2f}x), strength {args.strength}, {args.steps} steps")


if __name__ == "__main__":
    main()
