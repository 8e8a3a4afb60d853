"""Text-to-image with Stable Diffusion 1.5, timed without and with AgentSD.

    python examples/txt2img_sd15.py --prompt "a photo of a corgi on a beach" --out corgi

writes corgi-original.png and corgi-agentsd.png and prints both timings. Same seed, same noise:
the two images differ only by the patch.
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
    parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                        help="hub id or local folder")
    parser.add_argument("--prompt", default="a photo of a corgi on a beach at golden hour")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512, help="height and width in pixels (try 1024)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="txt2img", help="prefix of the two PNG files")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = AutoPipelineForText2Image.from_pretrained(args.model, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    settings = dict(prompt=args.prompt, height=args.size, width=args.size)

    timed(pipe, args.seed, num_inference_steps=2, **settings)  # warm-up: one-time setup is not timed
    original, seconds_original = timed(pipe, args.seed, num_inference_steps=args.steps, **settings)

    # The paper's settings: 40% of the tokens merged, agent attention for the first 40% of the steps.
    agentsd.apply_patch(pipe, ratio=0.4, seed=args.seed)
    timed(pipe, args.seed, num_inference_steps=2, **settings)
    patched, seconds_patched = timed(pipe, args.seed, num_inference_steps=args.steps, **settings)
    agentsd.remove_patch(pipe)  # the pipeline is exactly the original again

    original.save(f"{args.out}-original.png")
    patched.save(f"{args.out}-agentsd.png")
    print(f"original {seconds_original:.2f} s, AgentSD {seconds_patched:.2f} s "
          f"({seconds_original / seconds_patched:.2f}x) at {args.size}x{args.size}, {args.steps} steps")


if __name__ == "__main__":
    main()
