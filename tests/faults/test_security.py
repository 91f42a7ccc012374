"""Security properties, checked over the source tree and by behaviour: no remote code unless a config asks, no
unpickling of user files, weights saved as safetensors (shard paths: ``test_shard_faults.py``)."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
from fault_tools import REPO

SOURCE_DIRS = ("spr_lightning", "datamodules", "callbacks", "kernels")
SOURCES = sorted(p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py"))
# Known and reported (docs/reliability.md, "Open issues"); strict: the test fails once it is fixed.
UNSAFE_LOAD_KNOWN: dict[str, str] = {}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _name(node: ast.AST) -> str:
    """Dotted name of a call target (``torch.load``, ``AutoProcessor.from_pretrained``)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return "?"


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_the_scan_sees_the_source_tree():
    assert len(SOURCES) > 40 and any(p.name == "models.py" for p in SOURCES)


# ------------------------------------------------------------------------------------ trust_remote_code
def test_trust_remote_code_is_never_switched_on_in_code_and_defaults_to_false():
    problems = []
    for path in SOURCES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Call):
                value = _keyword(node, "trust_remote_code")
                if isinstance(value, ast.Constant) and value.value is not False:
                    problems.append(f"{_rel(path)}:{node.lineno} passes trust_remote_code={value.value!r}")
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args
                positional = args.posonlyargs + args.args
                defaults = dict(zip([a.arg for a in positional[len(positional) - len(args.defaults):]], args.defaults))
                defaults.update({a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None})
                names = [a.arg for a in positional + args.kwonlyargs]
                if "trust_remote_code" in names:
                    default = defaults.get("trust_remote_code")
                    if not (isinstance(default, ast.Constant) and default.value is False):
                        problems.append(f"{_rel(path)}:{node.lineno} {node.name}(): trust_remote_code must default "
                                        "to False")
    assert problems == []


def test_every_transformers_auto_loader_takes_trust_remote_code_from_config_or_leaves_the_safe_default():
    """An ``Auto*.from_pretrained`` call passes ``trust_remote_code=<a variable>`` (the config's value) or omits it
    (transformers then refuses repository code)."""
    seen, problems = 0, []
    for path in SOURCES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Call) and _name(node.func).endswith("from_pretrained"):
                owner = _name(node.func).rsplit(".", 1)[0]
                if not owner.startswith("Auto"):
                    continue  # peft's PeftModel loads adapter weights, no code
                seen += 1
                value = _keyword(node, "trust_remote_code")
                if value is not None and isinstance(value, ast.Constant):
                    problems.append(f"{_rel(path)}:{node.lineno} {owner}: constant trust_remote_code")
    assert seen >= 4 and problems == []


class _Loaded(Exception):
    """Raised by the patched loaders once they have recorded their arguments: nothing is really loaded."""


@pytest.fixture
def recorded(monkeypatch):
    import transformers

    calls: list[dict] = []

    def record(*args, **kwargs):
        calls.append(kwargs)
        raise _Loaded

    for auto in ("AutoModelForImageTextToText", "AutoProcessor"):
        monkeypatch.setattr(getattr(transformers, auto), "from_pretrained", record)
    return calls


def _build(kind: str, trust: bool | None):
    kwargs = {} if trust is None else {"trust_remote_code": trust}
    if kind == "generation":
        from spr_lightning.generation import CandidateGenerator

        CandidateGenerator("tiny:llava", "ferret", **kwargs).configure_model()
    elif kind == "evaluation":
        from spr_lightning.evaluation import GroundingEvaluator

        GroundingEvaluator("tiny:llava", **kwargs)
    elif kind == "dpo":
        from spr_lightning.dpo import DPOModule

        DPOModule("tiny:llava", **kwargs)
    elif kind == "policy":
        from spr_lightning.models import load_policy

        load_policy("tiny:llava", **kwargs)


@pytest.mark.parametrize("kind", ["generation", "evaluation", "dpo", "policy"])
def test_loaders_pass_the_configured_trust_remote_code_default_false(kind, recorded):
    for trust in (None, True):
        recorded.clear()
        with pytest.raises(_Loaded):
            _build(kind, trust)
        assert recorded and recorded[0].get("trust_remote_code", False) is bool(trust)


# ------------------------------------------------------------------------------------ deserialisation
def _unsafe_loads(path: Path) -> list[str]:
    found = []
    for node in ast.walk(_tree(path)):
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        if name == "torch.load":
            value = _keyword(node, "weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                found.append(f"{_rel(path)}:{node.lineno} torch.load without weights_only=True")
        elif name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "joblib.load"):
            found.append(f"{_rel(path)}:{node.lineno} {name}")
        elif name in ("numpy.load", "np.load") and _keyword(node, "allow_pickle") is not None:
            found.append(f"{_rel(path)}:{node.lineno} {name}(allow_pickle=...)")
        elif name == "yaml.load" and "Safe" not in ast.unparse(node):
            found.append(f"{_rel(path)}:{node.lineno} yaml.load without a safe loader")
    return found


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=UNSAFE_LOAD_KNOWN[_rel(p)]))
     if _rel(p) in UNSAFE_LOAD_KNOWN else p for p in SOURCES],
    ids=[_rel(p) for p in SOURCES],
)
def test_no_unsafe_deserialisation_of_user_files(path):
    assert _unsafe_loads(path) == []


class _RunsCode:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('pwned').write_text('x')",))


def test_refer_pickles_are_read_as_plain_data_only(tmp_path):
    from datamodules.grounding import convert_refer

    (tmp_path / "instances.json").write_text('{"images": [{"id": 1, "file_name": "a.jpg", "height": 4, "width": 4}],'
                                             ' "annotations": [{"id": 7, "bbox": [0, 0, 2, 2]}]}')
    refs = [{"ref_id": 3, "image_id": 1, "ann_id": 7, "split": "val", "sentences": [{"sent": "a thing"}]}]
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    assert convert_refer(tmp_path, "unc", tmp_path / "out.json") == 1

    (tmp_path / "refs(evil).p").write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(ValueError, match=r"refs\(evil\)\.p: not a plain-data pickle.*refused to load builtins\.exec"):
        convert_refer(tmp_path, "evil", tmp_path / "evil.json")
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


# ------------------------------------------------------------------------------------------ safetensors
def test_weights_are_only_saved_as_safetensors():
    problems = []
    for path in SOURCES:
        for node in ast.walk(_tree(path)):
            if not isinstance(node, ast.Call):
                continue
            name = _name(node.func)
            value = _keyword(node, "safe_serialization")
            if name.endswith("save_pretrained") and isinstance(value, ast.Constant) and value.value is not True:
                problems.append(f"{_rel(path)}:{node.lineno} save_pretrained(safe_serialization={value.value!r})")
            if name in ("torch.save", "pickle.dump", "pickle.dumps"):
                problems.append(f"{_rel(path)}:{node.lineno} {name} (weights and exports must be safetensors)")
    assert problems == []
