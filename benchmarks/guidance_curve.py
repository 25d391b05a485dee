"""The strength / identity curve of identity guidance on the test suite's tiny random pipelines (README table).

SD1.5 (`tests/test_reward_finetune.py`'s init with identity headroom, its DDPM scheduler, CFG 7.5) and FLUX.1
(`tests/test_reward_flow.py`'s tiny FLUX.1-dev, embedded guidance 3.5): 8 fixed-seed 32 px samples, 20 steps, guided
through `nearid_core.guidance_diffusers.guided` at each strength, scored against the tests' three subject images
with the tests' tiny NearID model: mean NearID cosine and mean cosine of the trunk's mean-pooled tokens (the
`siglip2-mean` readout, which NearID's head was not trained for), so over-guidance toward the references' raw
appearance shows. Random weights: the numbers say that the mechanism works and how it scales, not what a real
model gains.

    python benchmarks/guidance_curve.py [--strengths 0,0.005,0.01,0.02,0.05,0.1] [--families sd15,flux]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]


class _Folders:
    """The one `tmp_path_factory` method the tests' image fixture uses."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def mktemp(self, name: str) -> Path:
        (self.root / name).mkdir()
        return self.root / name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strengths", default="0,0.005,0.01,0.02,0.05,0.1")
    parser.add_argument("--families", default="sd15,flux")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import conftest
    import test_guidance
    import test_reward_finetune as sd_tests
    import test_reward_flow as flow_tests
    from diffusers import FluxPipeline, StableDiffusionPipeline

    import nearid_core
    from nearid_core import NearIDScorer
    from nearid_core.guidance_diffusers import guided

    work = Path(tempfile.mkdtemp(prefix="nearid-guidance-curve-"))
    (work / "vision").mkdir()
    conftest.tiny_vision_model(0).save_pretrained(work / "vision")
    conftest.write_preprocessor(work / "vision")
    nearid_core.save_release(conftest.tiny_nearid_model(1, backbone=str(work / "vision")), work / "release",
                             preprocessor_config=conftest.TINY_PREPROCESS.to_dict())
    scorer = NearIDScorer.from_pretrained(work / "release", device="cpu", dtype=torch.float32)
    subject = sd_tests.instance_dir.__wrapped__(_Folders(work))  # the tests' three subject images
    refs = sorted(str(p) for p in subject.glob("*.png"))
    builders = {"sd15": (StableDiffusionPipeline, sd_tests.save_tiny_sd15_with_headroom),
                "flux": (FluxPipeline, flow_tests.save_tiny_flux)}
    print("| family | strength | NearID cosine | mean-pool cosine |\n|---|---|---|---|")
    for family in args.families.split(","):
        cls, save = builders[family]
        pipe = cls.from_pretrained(save(work / family))
        pipe.set_progress_bar_config(disable=True)
        for strength in (float(s) for s in args.strengths.split(",")):
            if strength == 0:
                images = test_guidance.sample(pipe, family)
            else:
                with guided(pipe, scorer, refs, strength=strength):
                    images = test_guidance.sample(pipe, family)
            nearid, meanpool = test_guidance.identity(scorer, refs, images)
            print(f"| {family} | {strength:g} | {nearid:.3f} | {meanpool:.3f} |", flush=True)


if __name__ == "__main__":
    main()
