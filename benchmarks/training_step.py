"""What one training step of the real-data recipe costs on this CPU, in fp32 and with bf16 autocast of
the forward pass (``cpu_bf16``): the steps a CPU session can afford decide which recipes can be compared.

Both run the recipe's own optimisation (``training._Optimisation``: the bundled network, AdamW, Tversky +
cross-entropy, gradient clipping) on the same random batch of the recipe's size (batch x 3 x crop³, four
classes), interleaved so that a busy machine slows both alike: ``--repeats`` rounds of ``--steps`` steps
each, the median second per step reported. No data loading or augmentation is timed (the DataLoader
worker runs beside the steps in training).

    python benchmarks/training_step.py                     # configs/real-finetune.json
    python benchmarks/training_step.py --smoke
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RECIPE = common.ROOT / "BrainUNetSegmentation" / "brainunet_lab" / "configs" / "real-finetune.json"


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=RECIPE, help="training recipe (JSON) whose network and batch are timed")
    p.add_argument("--steps", type=int, default=4, help="steps per timed round")
    p.add_argument("--bf16-anyway", action="store_true",
                   help="time bf16 on a CPU without native bf16 too (emulated there: many times slower than fp32)")
    args = p.parse_args()
    import json

    import torch

    from brainunet_lab.crossval import recipe_config
    from brainunet_lab.training import TrainConfig, _Optimisation

    torch.set_num_threads(args.threads)
    overrides = json.loads(Path(args.config).read_text(encoding="utf-8"))
    from brainunet import weights

    bundled = next(e.name for e in weights.load_registry(weights.REGISTRY_PATH) if e.kind == "network")
    config = recipe_config(bundled, 10, scratch=True, device="cpu", seed=0, overrides=overrides)  # its network
    if args.smoke:
        config = TrainConfig(**{**config.to_dict(), "network": {**config.network, "features": [4, 8]},
                                "patch_size": [32, 32, 32], "batch_size": 1})
    crop, batch = list(config.patch_size), int(config.batch_size)
    steps, repeats = (1, 1) if args.smoke else (args.steps, args.repeats)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch, 3, *crop), generator=generator)
    y = torch.randint(0, 4, (batch, *crop), generator=generator)
    from brainunet.inference import cpu_has_native_bf16

    # Without native bf16 the autocast runs emulated: on such a 2-core EPYC this script's default run had
    # not finished after ten minutes (fp32 alone: about 5 s a step), and no recipe would train so there
    names = ("fp32", "bf16") if args.smoke or args.bf16_anyway or cpu_has_native_bf16() else ("fp32",)
    if names == ("fp32",):
        print("This CPU has no native bf16: only fp32 is timed (--bf16-anyway to time the emulated bf16 too).")
    contenders = {name: _Optimisation(TrainConfig(**{**config.to_dict(), "cpu_bf16": name == "bf16"}), None, "cpu", 1)
                  for name in names}
    for opt in contenders.values():  # first steps allocate and pick kernels: not timed
        opt.train_step(x, y)
    times = {name: [] for name in contenders}
    losses = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, opt in contenders.items():
            start = time.perf_counter()
            for _ in range(steps):
                loss, _ = opt.train_step(x, y)
            times[name].append((time.perf_counter() - start) / steps)
            losses[name].append(loss)
    median = {name: statistics.median(t) for name, t in times.items()}
    rows = [[name, median[name], median["fp32"] / median[name], losses[name][-1]] for name in contenders]
    table = common.md_table(["forward pass", "s per step (median)", "speed vs fp32", "loss after the rounds"], rows)
    common.save("training_step", args, {
        "config": str(args.config), "crop": crop, "batch": batch, "steps_per_round": steps, "rounds": repeats,
        "threads": args.threads, "seconds_per_step": times, "median_s": median,
        "bf16_speedup": median["fp32"] / median["bf16"] if "bf16" in median else None,
        "machine": common.machine()}, table)


if __name__ == "__main__":
    main()
