"""Turn a raw PyTorch / DDP / RL-trainer checkpoint into a Hugging Face safetensors model.

    python convert_checkpoint.py --checkpoint ckpt/actor_step500.pt --output models/news-rl
    python convert_checkpoint.py --checkpoint out/model.safetensors --base models/Qwen/Qwen3-8B --output models/x
    python convert_checkpoint.py --checkpoint ckpt.pt --output models/x --strip policy. --allow-missing

The checkpoint is a state dict (.pt / .bin, possibly nested under "state_dict" / "model" / "module",
read with torch.load(weights_only=True): tensors only, no code runs) or a .safetensors file. Its keys
lose wrapper prefixes (DDP/DeepSpeed `module.`, torch.compile `_orig_mod.`, RL trainers' `actor.`,
FSDP `_fsdp_wrapped_module.`; --strip adds more), repeatedly, but only when the stripped key is one
of the base architecture's. The tensors are loaded into the architecture of --base (its config.json;
default model.path), keeping the checkpoint's dtype. Missing tensors are an error (--allow-missing
takes them from the base's own weights); unexpected ones (a value head, optimizer leftovers) are
named and left out. Writes safetensors + the base's tokenizer, chat template and generation config +
manifest.json, atomically, after loading the result back and checking its logits equal those of
the model built from the checkpoint's tensors (0, or within 1e-6 in fp32).
"""
from __future__ import annotations

from common.logs import quiet_libraries  # noqa: I001  (first: torch logs a notice while it is imported)
quiet_libraries()

import pickle
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from common.cli import add_force, run_stage
from common.config import ConfigError, UserError
from common.model.files import check_model_dir, copy_extras, dir_size, save_atomically, weight_files, write_manifest
from common.model.loading import load_tokenizer
from common.text.prompts import probe_records, records_prompt_ids

DEFAULT_PREFIXES = ("module.", "_orig_mod.", "actor.", "_fsdp_wrapped_module.")
WRAPPER_KEYS = ("state_dict", "model", "module")  # Lightning, most trainers, DeepSpeed


class ConvertError(UserError, ValueError):
    """A checkpoint that cannot become the base architecture: one sentence naming what and why."""


# ----------------------------------------------------------------------------- reading
def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file or a (possibly nested) torch state dict."""
    if not path.is_file():
        raise ConvertError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except SafetensorError as e:
            raise ConvertError(f"{path} is not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # the unpickler's word for a class it will not import
            raise ConvertError(f"{path} is not a PyTorch checkpoint, or it is truncated") from None
        raise ConvertError(f"{path} holds Python objects besides tensors, which torch.load(weights_only=True) "
                           f"refuses to unpickle (it could run code); save just the weights: "
                           f"torch.save(model.state_dict(), PATH)") from None
    except Exception as e:  # noqa: BLE001 -- a file that is not a checkpoint breaks the unpickler in many ways
        raise ConvertError(f"{path} is not a PyTorch checkpoint, or it is truncated "
                           f"({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from None
    return unwrap(obj, path)


def unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, dict) and (key := next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)):
        obj = obj[key]
    if not isinstance(obj, dict):
        raise ConvertError(f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConvertError(f"{path} holds no tensors (top-level keys: {', '.join(map(str, list(obj)[:8]))})")
    return tensors


# ----------------------------------------------------------------------------- mapping onto the base
def build_base(base: Path, dtype: torch.dtype):
    """The base architecture from its config.json, with uninitialized weights (the checkpoint fills them)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    with no_init_weights():  # skip the random init: minutes on an 8B, and every value is replaced anyway
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base), dtype=dtype).eval()


def strip_key(key: str, prefixes: tuple[str, ...], known: set[str]) -> tuple[str, list[str]]:
    """Drop wrapper prefixes until the key is one the base has, and say which; a key that never gets
    there stays as it is (and is reported as unexpected)."""
    name, removed = key, []
    while name not in known:
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is None:
            return key, []
        name, removed = name[len(prefix):], removed + [prefix]
    return name, removed


def map_keys(tensors: dict[str, torch.Tensor], prefixes: tuple[str, ...], expected: dict[str, torch.Size]):
    """(tensors under the base's names, unexpected names, how many keys each prefix was stripped from)."""
    mapped, unexpected, stripped, known = {}, [], Counter(), set(expected)
    for key, tensor in tensors.items():
        name, removed = strip_key(key, prefixes, known)
        if name not in expected:
            unexpected.append(key)
            continue
        if name in mapped:
            raise ConvertError(f"two tensors of the checkpoint become {name} once prefixes are stripped ({key} is one)")
        if tuple(tensor.shape) != tuple(expected[name]):
            raise ConvertError(f"tensor {key} has shape {tuple(tensor.shape)} but the base architecture's {name} "
                               f"is {tuple(expected[name])}; is --base the architecture this checkpoint was trained from?")
        stripped.update(removed)
        mapped[name] = tensor
    return mapped, unexpected, dict(stripped)


def tensors_from_base(base: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The base's own weights for `names` (--allow-missing); an error naming any it does not hold."""
    from safetensors import safe_open
    files, _ = weight_files(base)
    found = {}
    for f in files:
        with safe_open(base / f, framework="pt") as st:
            held = set(st.keys())
            found.update({n: st.get_tensor(n) for n in names if n in held})
    absent = [n for n in names if n not in found]
    if absent:
        raise ConvertError(f"the checkpoint lacks {absent[0]} and the base {base} holds no weights for it either "
                           f"({len(absent)} such tensors)")
    return found


def checkpoint_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype most of the floating-point values are in: the converted model keeps it."""
    by_dtype = Counter()
    for t in tensors.values():
        if t.is_floating_point():
            by_dtype[t.dtype] += t.numel()
    return by_dtype.most_common(1)[0][0] if by_dtype else torch.float32


def tied_keys(model) -> set[str]:
    """Output-head names that are tied to the embeddings: a checkpoint need not hold them."""
    return set(getattr(model, "all_tied_weights_keys", None) or {}) if model.config.tie_word_embeddings else set()


# ----------------------------------------------------------------------------- the conversion
@torch.no_grad()
def probe_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits[0].float()


def load_into_base(tensors: dict[str, torch.Tensor], base: Path, prefixes: tuple[str, ...], allow_missing: bool):
    """The base architecture holding the checkpoint's tensors, and what the mapping found."""
    dtype = checkpoint_dtype(tensors)
    model = build_base(base, dtype)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    mapped, unexpected, stripped = map_keys(tensors, prefixes, expected)
    tied = tied_keys(model)
    missing = [k for k in expected if k not in mapped and k not in tied]
    if missing and not allow_missing:
        raise ConvertError(f"the checkpoint lacks {len(missing)} tensor{'s' * (len(missing) > 1)} of the base "
                           f"architecture: {', '.join(missing[:5])}; check --base and --strip, or pass "
                           f"--allow-missing to take them from the base's own weights")
    state = {**mapped, **(tensors_from_base(base, missing) if missing else {})}
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)  # assign: the checkpoint's tensors, not copies
    if tied:
        model.tie_weights()
    return model, {"dtype": dtype, "loaded": len(mapped), "expected": len(expected), "unexpected": unexpected,
                   "missing": missing, "stripped": stripped}


def run(cfg, checkpoint: str, output: str, base: str | None = None, strip: tuple[str, ...] = (),
        allow_missing: bool = False, force: bool = False) -> dict:
    """Load `checkpoint`'s tensors into the architecture of `base` (default model.path) and write `output`."""
    from transformers import AutoModelForCausalLM
    base = Path(base) if base else cfg.resolve(cfg.model.path)
    ckpt, target = Path(checkpoint), Path(output)
    if not (base / "config.json").is_file() or not (base / "tokenizer_config.json").is_file():
        raise ConfigError(f"--base {base} needs config.json and a tokenizer: pass the model directory the "
                          f"checkpoint was trained from")
    if target.exists() and not force:
        raise ConfigError(f"{target} exists; pass --force to replace it")
    start = time.time()
    tensors = read_checkpoint(ckpt)
    model, found = load_into_base(tensors, base, DEFAULT_PREFIXES + tuple(strip), allow_missing)
    del tensors  # the model holds what it needs
    tokenizer = load_tokenizer(base)
    # the round-trip check compares logits on one prompt: the chat probe of the prompt contract
    ids = torch.tensor(records_prompt_ids(tokenizer, probe_records(None, cfg.prompt)[:1], None, cfg.prompt))
    expected = probe_logits(model, ids)
    tolerance = 1e-6 if found["dtype"] == torch.float32 else 0.0

    def write(tmp: Path) -> None:
        nonlocal model
        model.save_pretrained(tmp)
        copy_extras([base], tmp)
        model = None  # one copy in memory at a time: an 8B is 16-32 GB
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=found["dtype"], device_map={"": "cpu"}).eval()
        found["max_abs_diff"] = (probe_logits(reloaded, ids) - expected).abs().max().item()
        if not found["max_abs_diff"] <= tolerance:
            raise ConvertError(f"the saved model's logits differ from the checkpoint's by {found['max_abs_diff']:.3g} "
                               f"(allowed {tolerance:g}); nothing was written")
        problems = [f.message for f in check_model_dir(tmp) if f.level == "fail"]
        if problems:
            raise ConvertError(f"the converted directory is incomplete: {problems[0]}")
        write_manifest(tmp, source="convert", checkpoint=str(ckpt), base=str(base), stripped=found["stripped"],
                       unexpected=found["unexpected"], from_base=found["missing"], max_abs_diff=found["max_abs_diff"])

    save_atomically(target, write, force)
    return {**found, "tolerance": tolerance, "checkpoint": ckpt, "base": base, "target": target,
            "size": dir_size(target), "seconds": time.time() - start}


def report(f: dict) -> None:
    stripped = ", ".join(f"{p} from {n}" for p, n in f["stripped"].items()) or "none"
    print(f"{f['checkpoint']}: prefixes stripped: {stripped}")
    print(f"loaded into {f['base'].name}'s architecture ({str(f['dtype']).removeprefix('torch.')}): "
          f"{f['loaded']} of {f['expected']} tensors, {len(f['missing'])} missing, {len(f['unexpected'])} unexpected")
    if f["missing"]:
        print(f"  taken from the base (--allow-missing): {', '.join(f['missing'][:10])}")
    if f["unexpected"]:
        print(f"  unexpected, left out: {', '.join(f['unexpected'][:10])}"
              + (f" and {len(f['unexpected']) - 10} more" if len(f["unexpected"]) > 10 else ""))
    print(f"round trip: max |logit diff| {f['max_abs_diff']:.3g} (allowed {f['tolerance']:g})")
    print(f"wrote {f['target']}/ (safetensors, tokenizer, chat template, generation config, manifest.json): "
          f"{f['size'] / 1e6:.1f} MB in {f['seconds']:.1f}s")


def add_args(parser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="FILE", help=".pt / .bin state dict or .safetensors")
    parser.add_argument("--base", metavar="DIR", help="model directory whose architecture and tokenizer to use "
                                                      "(default: model.path)")
    parser.add_argument("--output", required=True, metavar="DIR", help="the Hugging Face model directory to write")
    parser.add_argument("--strip", action="append", default=[], metavar="PREFIX",
                        help=f"another key prefix to strip (repeatable; always: {' '.join(DEFAULT_PREFIXES)})")
    parser.add_argument("--allow-missing", action="store_true", help="take tensors the checkpoint lacks from the base")
    add_force(parser)


def main(argv=None) -> int:
    return run_stage("convert_checkpoint", __doc__, lambda cfg, a: run(cfg, a.checkpoint, a.output, a.base,
                                                                          tuple(a.strip), a.allow_missing, a.force),
                     add_args=add_args, report=report, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
