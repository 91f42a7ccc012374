"""One-off probe (docs/results/notebook.md, "Colour made loud for the language model"): give a trained small LLaVA's
projector channels that carry each object's colour, shape and size loudly, then continue SFT and see whether REC
starts to pick objects by colour.

Ridge probes of the tower token at each object's box centre (colour, shape, size, one-hot targets) replace the
``linear_1`` rows that matter least (activation std x ``linear_2`` column norm), scaled so their pre-activations
are ``--gain`` times a typical row's; their ``linear_2`` columns are random with a typical norm. Run by hand, not
part of the package:

    python docs/results/probes/attribute_channels.py MODEL OUT INSTANCES_JSON IMAGE_ROOT [--gain 3] [--images 800]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from spr_lightning.experiments.token_variance import centre_tokens, read_objects, variance_explained
from spr_lightning.models import load_policy, load_processor

ATTRIBUTES = ("color", "shape", "size")


def ridge_probes(
    tokens: torch.Tensor, attributes: list[dict[str, str]], holdout: float = 0.2
) -> tuple[torch.Tensor, dict]:
    """Rows ``[C_total, D + 1]`` (weights, bias) of one-hot ridge probes per attribute, and held-out accuracies."""
    n = tokens.shape[0]
    split = int(n * (1 - holdout))
    x = torch.cat([tokens, torch.ones(n, 1)], 1).double()
    rows, report = [], {}
    for key in ATTRIBUTES:
        classes = sorted({a[key] for a in attributes})
        index = torch.tensor([classes.index(a[key]) for a in attributes])
        target = torch.nn.functional.one_hot(index, len(classes)).double()
        a = x[:split]
        weights = torch.linalg.solve(a.T @ a + torch.eye(a.shape[1], dtype=a.dtype), a.T @ target[:split])
        accuracy = float(((x[split:] @ weights).argmax(1) == index[split:]).double().mean())
        report[key] = {"classes": classes, "heldout_accuracy": round(accuracy, 3)}
        rows.append(weights.T.float())
    return torch.cat(rows), report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("instances")
    parser.add_argument("image_root")
    parser.add_argument("--gain", type=float, default=3.0)
    parser.add_argument("--images", type=int, default=800)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, processor = load_policy(args.model).eval(), load_processor(args.model)
    pictures, boxes, attributes = read_objects(args.instances, args.image_root, args.images)
    tower, projected, cells = centre_tokens(model, processor, pictures, boxes)
    probes, report = ridge_probes(tower, attributes)
    projector = model.model.multi_modal_projector
    first, second = projector.linear_1, projector.linear_2
    with torch.no_grad():
        before = tower @ first.weight.T + first.bias
        importance = torch.nn.functional.gelu(before).std(0) * second.weight.norm(dim=0)
        replaced = importance.argsort()[: probes.shape[0]]
        probe_out = tower @ probes[:, :-1].T + probes[:, -1]
        scale = args.gain * before.std(0).median() / probe_out.std(0).mean()
        first.weight[replaced] = probes[:, :-1] * scale
        first.bias[replaced] = probes[:, -1] * scale
        columns = torch.randn(second.weight.shape[0], len(replaced))
        second.weight[:, replaced] = columns / columns.norm(dim=0) * second.weight.norm(dim=0).median()
        after = projector(tower)
    labels = {key: [a[key] for a in attributes] for key in ATTRIBUTES} | {"cell": cells}
    report["projector_before"] = {k: round(variance_explained(projected, v), 4) for k, v in labels.items()}
    report["projector_after"] = {k: round(variance_explained(after, v), 4) for k, v in labels.items()}
    report |= {"replaced_rows": replaced.tolist(), "gain": args.gain, "objects": len(cells)}
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    Path(args.out, "attribute_channels.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(json.dumps({k: v for k, v in report.items() if k != "replaced_rows"}, indent=1))


if __name__ == "__main__":
    main()
