"""The registry of base model families: InternVL (the paper's base) and Qwen2.5-VL (the Table III analogue).

``--base DIR`` picks the family from ``DIR/config.json``'s ``model_type``; without a base the tiny config
name does (``--tiny-model demo`` or ``demo-qwen``); a run's ``run_config.json`` records its family for
the report. Each family's folder (internvl/, qwen/) implements the hooks of family.Family over its own
modules; what the families share is written once beside them (captioner, data, fusion, text). A new
family is one folder and one entry in ``FAMILIES``.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from stages.families.family import Family, FamilyError
from stages.families.internvl.family import InternVL
from stages.families.qwen.family import Qwen25VL


FAMILIES: dict[str, Family] = {f.name: f for f in (InternVL(), Qwen25VL())}
DEFAULT = FAMILIES["internvl"]


def by_model_type(model_type: str) -> Family:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    if model_type == "internvl_chat":  # an original InternVL2 checkpoint: load_base says to convert it
        return DEFAULT
    known = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    raise FamilyError(f"model_type '{model_type}' is no supported base family (supported: {known})")


def of_base(path: str | Path) -> Family:
    """The family of a checkpoint dir (or its config.json), from ``model_type``."""
    path = Path(path)
    file = path if path.is_file() else path / "config.json"
    if not file.exists():
        raise FamilyError(f"{path}: no config.json (expected a local Hugging Face checkpoint directory)")
    return by_model_type(json.loads(file.read_text()).get("model_type", ""))


def of_name(name: str) -> Family | None:
    """The family of a registered tiny or named config (None when no family registers it)."""
    for family in FAMILIES.values():
        if name in family.tiny_names() or name in family.named_names():
            return family
    return None


def of_tiny(name: str) -> Family:
    family = of_name(name)
    if family is None or name not in family.tiny_names():
        known = ", ".join(n for f in FAMILIES.values() for n in f.tiny_names())
        raise FamilyError(f"unknown tiny model {name!r} (known: {known})")
    return family


def of_train(base: str | None, tiny_model: str) -> Family:
    """The family of a fine-tuning run: its base's, else its tiny model's."""
    return of_base(base) if base else of_tiny(tiny_model)


def of_config(config: Any) -> Family:
    return by_model_type(config.model_type)


def meta_model(config: Any) -> Any:
    """The model of ``config`` on the meta device (no memory, no weights). Outside ZeRO-3's ``zero.Init``,
    which transformers would otherwise enter (a collective) once a ZeRO-3 TrainingArguments exists."""
    import torch
    from transformers.integrations import deepspeed as hf_deepspeed

    saved, hf_deepspeed._hf_deepspeed_config_weak_ref = hf_deepspeed._hf_deepspeed_config_weak_ref, None
    try:
        with torch.device("meta"):
            return of_config(config).model_class()(config)
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def of_run(run_cfg: dict[str, Any]) -> Family:
    """The family a run recorded in run_config.json (runs from before the registry are InternVL)."""
    return FAMILIES[run_cfg.get("family", DEFAULT.name)]


def check_run(run_dir: Path, family: Family) -> None:
    """A run dir holds one family's checkpoints: resuming it with another base family is an error."""
    file = Path(run_dir) / "run_config.json"
    recorded = of_run(json.loads(file.read_text())) if file.exists() else family
    if recorded is not family:
        raise FamilyError(f"{run_dir} holds a {recorded.label} run; this one is {family.label}: choose another --run")


def spec_record(family: Family, spec: Any) -> dict[str, Any]:
    """run_config.json entries of a run's data spec."""
    return {"family": family.name, family.spec_key: asdict(spec)}


def model_names(tiny_only: bool = False) -> str:
    """The registered model names per family, for the CLI's help: ``tiny, demo (InternVL), ...``."""
    return ", ".join(f"{', '.join(f.tiny_names() + ([] if tiny_only else f.named_names()))} ({f.label})"
                     for f in FAMILIES.values())
