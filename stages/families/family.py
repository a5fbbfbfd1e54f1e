"""The interface of a base model family: what training, planning and generation ask of it.

Heavy imports (torch, transformers) stay inside a family's methods, so the registry and the CLI load fast.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError


class FamilyError(PipelineError, ValueError):
    """A base or tiny model no family supports."""


class Family:
    """What a base family declares and the hooks the stages call (each family's folder implements them)."""

    name: str  # recorded in run_config.json
    label: str  # for people (tables, messages)
    paper_table: str  # the paper's ablation table of the family's base ("II" | "III")
    untrained_run: str  # run name of the family's base before fine-tuning (the baseline row)
    spec_key: str  # run_config.json entry of the data spec
    model_types: tuple[str, ...]  # config.json model_type values of the family's checkpoints
    lora_modules: dict[str, str]  # part -> module name kept fully trainable beside LoRA (peft modules_to_save)

    # ---- configs and models
    def tiny_names(self) -> list[str]:
        """Registered tiny shapes (``--tiny-model``): random weights, for tests and the demo."""
        raise NotImplementedError

    def named_names(self) -> list[str]:
        """Registered real shapes (memory plans without weights)."""
        raise NotImplementedError

    def tiny_config(self, name: str, vocab_size: int, fusion: str) -> Any:
        raise NotImplementedError

    def named_config(self, name: str, fusion: str) -> Any:
        raise NotImplementedError

    def ias_config(self, config: Any, fusion: str) -> Any:
        """A base checkpoint's config as the family's IAS config."""
        raise NotImplementedError

    def model_class(self) -> type:
        raise NotImplementedError

    def build_tiny(self, name: str, tokenizer: Any, fusion: str) -> Any:
        raise NotImplementedError

    def load_base(self, path: str | Path, fusion: str, **kwargs: Any) -> tuple[Any, list[str]]:
        """(model, the checkpoint's missing keys: the fusion's new parameters) of a base checkpoint dir."""
        raise NotImplementedError

    def layers(self, model: Any) -> tuple[Any, Any]:
        """(vision tower layers, LLM decoder layers) of a model of this family."""
        raise NotImplementedError

    # ---- memory plan (stages/finetune/plan.py)
    def plan_shapes(self, config: Any, setting: Any) -> Any:
        """The shapes.Shapes of the largest sample a plan.Setting lets through."""
        raise NotImplementedError

    def vision_layer_bytes(self, s: Any, a: int, r: int, cast: bool, trainable_vit: bool, cross: bool) -> int:
        """Bytes autograd keeps per vision token for one vision layer: compute dtype of ``a`` bytes, residual
        stream of ``r`` bytes, ``cast``: autocast keeps a compute-dtype copy of each fp32 Linear input."""
        raise NotImplementedError

    # ---- tokenizer
    def dataset_tokenizer(self, texts: list[str], directory: Path, vocab_size: int) -> Any:
        """The tokenizer saved in ``directory``, else the demo BPE trained on ``texts`` and saved there."""
        from stages.families.text import save_tokenizer

        if not (Path(directory) / "tokenizer.json").exists():
            save_tokenizer(self.train_tokenizer(texts, vocab_size), Path(directory))
        return self.load_tokenizer(Path(directory))

    def train_tokenizer(self, texts: list[str], vocab_size: int) -> Any:
        """The demo BPE trained on ``texts``, with the family's special tokens and chat template."""
        raise NotImplementedError

    def load_tokenizer(self, directory: Path) -> Any:
        raise NotImplementedError

    # ---- data
    def data_spec(self, cfg: Any, config: Any) -> Any:
        """How a training run's images become model inputs (a TrainConfig and the model's config)."""
        raise NotImplementedError

    def spec_from_run(self, config: Any, run_cfg: dict[str, Any]) -> Any:
        """The data spec a run recorded in run_config.json (generation uses the training spec)."""
        raise NotImplementedError

    def dataset(self, cfg: Any, tokenizer: Any, spec: Any, store: Any) -> Any:
        """The training split as a data.CritiqueData."""
        raise NotImplementedError

    def collator(self, tokenizer: Any, keep_sample_ids: bool) -> Any:
        raise NotImplementedError

    # ---- generation
    def captioner(self, model: Any, tokenizer: Any, spec: Any, device: Any = None) -> Any:
        """A captioner.Captioner of the family."""
        raise NotImplementedError
