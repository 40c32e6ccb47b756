"""CI: ember's TensorBoard event files read back by TensorBoard's own event reader.

    python scripts/check_tensorboard.py <run dir>

Every scalar of metrics.jsonl (train loss, learning rate, grad norm, tokens/s, eval loss) must be
in the events once per step with its value (as float32), and the recipe must be there as text.
"""
import json
import sys

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TAGS = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
        "tokens_per_second": "train/tokens_per_second", "eval_loss": "eval/loss"}


def main():
    run = sys.argv[1]
    events = EventAccumulator(f"{run}/tensorboard", size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    lines = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
    for key, tag in TAGS.items():
        expected = [(l["step"], l[key]) for l in lines if key in l]
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        steps = [s for s, _ in got]
        assert steps == [s for s, _ in expected], (tag, steps, [s for s, _ in expected])
        assert len(set(steps)) == len(steps), f"{tag}: duplicate steps {steps}"
        assert all(np.float32(v) == np.float32(w) for (_, v), (_, w) in zip(got, expected)), tag
        print(f"{tag}: {len(got)} steps ({steps[0]}..{steps[-1]}), values equal metrics.jsonl")
    text = events.Tensors("recipe")[0].tensor_proto.string_val[0].decode()
    assert "[adapter]" in text and "[train]" in text, text[:200]
    print(f"recipe text: {len(text)} characters")


if __name__ == "__main__":
    main()
