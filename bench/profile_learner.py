"""CPU per labelled example of the online models' learning, against River's own.

The learner process spends most of its time in :meth:`scorers.online.OnlineModel.learn`:
score the example (prequential quality), update the metrics and the drift detector, then
learn. This times it per example on synthetic examples with every input of
:data:`scorers.labels.INPUT_NAMES`, and times River's pipeline doing the model's part alone
(``predict_proba_one`` then ``learn_one``, what ``learn`` called before it learned on flat
lists). Both see the same examples; the run ends by checking that the two reached the same
weights, so the figure compares the same work.

Run ``python -m bench.profile_learner`` (``--examples N``, ``--seed S``).
"""

from __future__ import annotations

import argparse
import math
import random
import time
from typing import Any

from river import compose, linear_model, optim, preprocessing

from scorers.labels import INPUT_NAMES, Example
from scorers.online import OnlineModel


def examples(n: int, seed: int) -> list[Example]:
    """Labelled examples whose inputs have the scales of the real ones (counts, logs,
    indicators), the label depending on two of them."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        x = {name: (float(rnd.random() < 0.5) if name.startswith("has_")
                    else abs(rnd.gauss(0, 1)) * rnd.choice((1.0, 3.0, 10.0)))
             for name in INPUT_NAMES}
        z = x[INPUT_NAMES[3]] - x[INPUT_NAMES[5]]
        y = int(rnd.random() < 1 / (1 + math.exp(-max(-30.0, min(30.0, z)))))
        out.append(Example(f"e{i}", "churn", "h", i, i, x, y))
    return out


def run(n: int, seed: int) -> dict[str, Any]:
    data = examples(n, seed)
    model = OnlineModel("churn")
    t0 = time.process_time()
    for e in data:
        model.learn(e)
    ours = time.process_time() - t0
    river: Any = compose.Pipeline(
        preprocessing.StandardScaler(),
        linear_model.LogisticRegression(optimizer=optim.RMSProp(0.001), l2=1e-4))
    t0 = time.process_time()
    for e in data:
        river.predict_proba_one(e.x)
        river.learn_one(dict(e.x), e.y == 1)
    theirs = time.process_time() - t0
    mine, ref = model.weights(), river.steps["LogisticRegression"].weights
    worst = max(abs(mine[k] - ref[k]) / max(abs(ref[k]), 1e-300) for k in ref)
    return {"examples": n, "inputs": len(INPUT_NAMES),
            "learn_us_per_example": ours / n * 1e6,
            "river_model_only_us_per_example": theirs / n * 1e6,
            "largest_relative_weight_difference": worst}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    r = run(args.examples, args.seed)
    print(f"{r['examples']:,} examples of {r['inputs']} inputs: OnlineModel.learn "
          f"{r['learn_us_per_example']:.1f} CPU us/example (scoring, metrics, drift, "
          f"learning); River's pipeline, predict and learn only: "
          f"{r['river_model_only_us_per_example']:.1f}; weights agree to "
          f"{r['largest_relative_weight_difference']:.1e} (relative)")


if __name__ == "__main__":
    main()
