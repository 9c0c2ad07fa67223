"""`ffcv-imagenet export RUN_OR_CHECKPOINT --export.out=DIR`: a trained model as files other tools load.

DIR receives, written into a temporary folder beside it and renamed into place when complete:

- `model.safetensors` and `model.pt` (a plain `state_dict`, torch.save): the same weights, the
  weight average when the run kept one (training.ema_decay > 0), else the model
  (`--export.weights=model|ema` chooses), on the CPU, contiguous (channels-last, DDP `module.` and
  torch.compile `_orig_mod.` prefixes gone), BatchNorm buffers included;
- `model.json`: the architecture and the options that shape it, the number of classes and the
  ordered wnids (label i is wnids[i]), the validation input (resolution, crop, normalisation),
  the top-1/top-5 the run logged for these weights, preset, git commit, the SHA-256 of each file,
  and `loads_into`: the calls that load the files with `strict=True`.

Key names follow the library that defines the architecture: torchvision's for a plain
torchvision model (no ResNet-D, BlurPool, max-blur stem, self-attention, other activation); timm's
for a ResNet-18/34/50/101/152 whose only changes are ResNet-D and/or SiLU/Mish (timm's
`resnet50d` etc., `act_layer=`); this package's for the rest, which neither library builds
(`TIMM_MISSING` says why). `load_model(DIR)` rebuilds any of them from model.json alone.
"""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from ffcv_imagenet.command import Command, Option, Positional

WEIGHTS = ("auto", "model", "ema")  # auto: the weight average when the run kept one
MANIFEST, SAFETENSORS, STATE_DICT = "model.json", "model.safetensors", "model.pt"
FORMAT = 1  # model.json's "format"; raised when a field changes meaning
# ResNets whose ResNet-D form timm names `<arch>d`; timm's `<arch>` is torchvision's, key for key
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # what DDP and torch.compile put before every key
TIMM_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
TIMM_ACTIVATIONS = {"relu": None, "silu": "silu", "mish": "mish"}  # ours -> timm's act_layer
# options timm's ResNet cannot express, and why (the weights would load but compute otherwise)
TIMM_MISSING = {
    "use_blurpool": "BlurPool: ours blurs before each strided conv, timm's aa_layer after it",
    "stem_pool": "max-blur stem pool: timm has it only together with aa_layer in every block",
    "self_attention": "self-attention: timm's ResNet has no SimpleSelfAttention",
}


class ExportError(ValueError):
    """A run, checkpoint or output folder that cannot be exported; the message names it."""


def find_checkpoint(path) -> Path:
    """The checkpoint of a run folder (its checkpoint.pt) or the checkpoint file itself."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
        if not path.exists():
            raise ExportError(f"{path}: no such file (is {path.parent} a run folder?)")
    elif not path.exists():
        raise ExportError(f"{path}: no such run folder or checkpoint")
    return path


def clean_state(state: dict) -> dict:
    """The state_dict as another process loads it: DDP's `module.` and torch.compile's
    `_orig_mod.` prefixes removed, every tensor on the CPU and contiguous (safetensors refuses
    channels-last strides, and a channels-last .pt would carry them into the loading model)."""
    cleaned = {}
    for key, tensor in state.items():
        while key.startswith(WRAPPER_PREFIXES):  # DDP(compile(m)) and compile(DDP(m)) nest both
            key = key.split(".", 1)[1]
        cleaned[key] = tensor.detach().to("cpu", memory_format=torch.contiguous_format).clone()
    return cleaned


def pick_weights(checkpoint: dict, path, choice: str) -> tuple:
    """("ema" or "model", its state_dict) as `choice` (one of WEIGHTS) asks."""
    ema = checkpoint.get("ema")
    if choice == "ema" and not ema:
        raise ExportError(f"{path}: export.weights=ema, but this checkpoint holds no weight average "
                          "(the run had training.ema_decay=0); use --export.weights=model")
    name = "ema" if choice == "ema" or (choice == "auto" and ema) else "model"
    return name, clean_state(ema["module"] if name == "ema" else checkpoint["model"])


def class_list(checkpoint: dict, path) -> tuple:
    """(ordered wnids, where they came from): the checkpoint's own list (train saves it), else,
    for checkpoints without one, the metadata written beside the run's val .beton."""
    if checkpoint.get("wnids"):
        return list(checkpoint["wnids"]), "checkpoint"
    from ffcv_imagenet.metadata import metadata_path, read_metadata

    val = ((checkpoint.get("config") or {}).get("data") or {}).get("val_dataset")
    if not val:
        raise ExportError(f"{path}: the checkpoint records neither its class list (wnids) nor "
                          "data.val_dataset to read it from")
    try:
        return list(read_metadata(val)["wnids"]), str(metadata_path(val))
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"{path}: no class list (wnids) in the checkpoint, and none from its "
                          f"data.val_dataset: {e}") from None


def logged_accuracy(folder: Path, epochs_done, weights: str, had_ema: bool) -> dict:
    """top-1/top-5 that log.jsonl holds for these weights: the validation after the checkpoint's
    last epoch (`*_no_ema` for the raw model of an EMA run, logged after the last epoch only).
    None values, with the reason, when the log is absent or did not validate these weights."""
    from ffcv_imagenet.logger import RunLogger

    log = folder / "log.jsonl"
    suffix = "_no_ema" if weights == "model" and had_ema else ""
    epoch = None if epochs_done is None else int(epochs_done) - 1  # the log counts from 0
    result = {"top_1": None, "top_5": None, "epoch": epoch, "source": str(log)}
    if not log.exists():
        return {**result, "source": None, "why_none": f"no {log} beside the checkpoint"}
    # a resumed run logs an epoch again: its last line counts, as in the report
    records = [r for r in RunLogger(folder, enabled=False).records()
               if r.get("type") == "epoch" and r.get("epoch") == epoch]
    if not records or records[-1].get("top_1" + suffix) is None:
        why = f"{log} holds no validation of these weights after epoch {epoch}"
        if suffix:
            why += " (an EMA run validates its raw model after the last epoch only)"
        return {**result, "why_none": why}
    return {**result, "top_1": records[-1]["top_1" + suffix], "top_5": records[-1].get("top_5" + suffix)}


def changed_options(options: dict) -> set:
    """The architecture options that differ from create_model's defaults (torchvision's model)."""
    import inspect

    from ffcv_imagenet.models import create_model

    defaults = inspect.signature(create_model).parameters
    return {key for key, value in options.items() if value != defaults[key].default}


def timm_blockers(arch: str, options: dict) -> list:
    """Why timm's ResNet cannot hold this model ([] when it can)."""
    if arch not in TIMM_RESNETS:
        return [f"timm has no ResNet-style counterpart of torchvision's {arch}"]
    blockers = [TIMM_MISSING[key] for key in sorted(changed_options(options) & set(TIMM_MISSING))]
    if options["activation"] not in TIMM_ACTIVATIONS:
        blockers.append(f"activation {options['activation']}: no timm act_layer of that name")
    return blockers


def targets(arch: str, options: dict, num_classes: int) -> tuple:
    """(the key names the files use, the `loads_into` list of model.json, the reasons a library
    does not load them)."""
    entries, reasons = [], []
    if not changed_options(options):
        entries.append({"library": "torchvision", "strict": True,
                        "call": f"torchvision.models.{arch}(num_classes={num_classes})"})
    else:
        reasons.append("torchvision: it builds none of ResNet-D, BlurPool, max-blur stem, "
                       "self-attention or another activation")
    blockers = timm_blockers(arch, options)
    if blockers:
        reasons += [f"timm: {why}" for why in blockers]
    else:
        name = arch + ("d" if options["resnet_d"] else "")
        kwargs = {"num_classes": num_classes}
        if TIMM_ACTIVATIONS[options["activation"]]:
            kwargs["act_layer"] = TIMM_ACTIVATIONS[options["activation"]]
        call = ", ".join([repr(name)] + [f"{k}={v!r}" for k, v in kwargs.items()])
        entries.append({"library": "timm", "strict": True, "model": name, "kwargs": kwargs,
                        "call": f"timm.create_model({call})"})
    entries.append({"library": "ffcv_imagenet", "strict": True, "call": "ffcv_imagenet.export.load_model(DIR)"})
    key_names = entries[0]["library"]
    return key_names, entries, reasons


def key_map(model: torch.nn.Module, manifest: dict) -> dict:
    """{our state_dict key: the exported key} for model.json's `key_names`. Only timm's ResNet-D
    differs from ours: its shortcut is always Sequential(pool, conv, BN), the pool an Identity
    where the stride is 1 (resnet50's layer1), while ours leaves that pool out, so the indices
    shift by one. (Plain shortcuts, Sequential(conv, BN), are the same in all three.)"""
    keys = list(model.state_dict())
    mapping = dict(zip(keys, keys))
    if manifest["key_names"] != "timm" or not manifest["model_options"]["resnet_d"]:
        return mapping
    for name, module in model.named_modules():
        if name.endswith("downsample") and isinstance(module[0], torch.nn.Conv2d):
            for key in keys:
                if key.startswith(name + "."):
                    index, rest = key[len(name) + 1:].split(".", 1)
                    mapping[key] = f"{name}.{int(index) + 1}.{rest}"
    return mapping


def input_spec(cfg: dict) -> dict:
    """How validation fed the model: what a user must do to an image to get the logged accuracy."""
    from ffcv_imagenet.data import IMAGENET_MEAN, IMAGENET_STD

    val = cfg.get("validation") or {}
    return {"resolution_px": val.get("resolution"), "crop_ratio": val.get("crop_ratio"),
            "resize": "centre square crop of crop_ratio x the shorter side, resized to "
                      "resolution_px x resolution_px",
            "channels": "RGB", "scale": "pixel / 255", "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "flip_tta": val.get("lr_tta"),
            "train_final_resolution_px": (cfg.get("resolution") or {}).get("max_res")}


def run_facts(folder: Path, cfg: dict) -> dict:
    """Preset and git commit of the run (its env.json, beside the checkpoint)."""
    config_file = (cfg.get("meta") or {}).get("config_file")
    commit = None
    env = folder / "env.json"
    if env.exists():
        try:
            commit = json.loads(env.read_text()).get("git_commit")
        except (json.JSONDecodeError, AttributeError):
            commit = None
    return {"preset": Path(config_file).stem if config_file else None, "config_file": config_file,
            "git_commit": commit}


def build_manifest(checkpoint: dict, path: Path, weights: str) -> dict:
    """model.json's content, less the files' hashes (added once they are written)."""
    from ffcv_imagenet.models import architecture_options

    cfg = checkpoint.get("config") or {}
    if "model" not in cfg or "training" not in cfg:
        raise ExportError(f"{path}: the checkpoint holds no config (model, training) to rebuild "
                          "the model from")
    arch = checkpoint.get("arch") or cfg["model"]["arch"]
    options = architecture_options(cfg["model"], cfg["training"]["use_blurpool"])
    wnids, wnids_from = class_list(checkpoint, path)
    num_classes = int(checkpoint.get("num_classes") or len(wnids))
    if num_classes != len(wnids):
        raise ExportError(f"{path}: {num_classes} classes, but the class list from {wnids_from} "
                          f"holds {len(wnids)}")
    key_names, loads_into, reasons = targets(arch, options, num_classes)
    return {"format": FORMAT, "arch": arch, "model_options": options, "num_classes": num_classes,
            "wnids": wnids, "wnids_from": wnids_from, "key_names": key_names,
            "loads_into": loads_into, "does_not_load_into": reasons, "weights": weights,
            "epochs_done": checkpoint.get("epoch"), "input": input_spec(cfg),
            "val": logged_accuracy(path.parent, checkpoint.get("epoch"), weights, bool(checkpoint.get("ema"))),
            **run_facts(path.parent, cfg), "checkpoint": str(path.resolve())}


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _finish(path, mode: int) -> None:
    """On disk before the rename, readable as any file this process makes (safetensors writes
    its file owner-only)."""
    os.chmod(path, mode)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse to replace a folder that holds anything, unless it is an earlier export and
    `overwrite` is given."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir():
        raise ExportError(f"export.out={out} is a file, not a folder")
    if not (out / MANIFEST).exists():
        raise ExportError(f"export.out={out} holds files but no {MANIFEST} (not an export); "
                          "choose another folder")
    if not overwrite:
        raise ExportError(f"export.out={out} already holds an export; --export.overwrite=1 replaces it")


def write_export(out: Path, state: dict, manifest: dict, overwrite: bool) -> None:
    """The three files into a temporary folder beside `out`, then renamed to `out` (an earlier
    export there moved aside first and removed last): a reader never sees half an export."""
    from safetensors.torch import save_file

    check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (out.parent / f".{out.name}.{what}{os.getpid()}" for what in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(state, tmp / SAFETENSORS, metadata={"format": "pt"})
        torch.save(state, tmp / STATE_DICT)
        manifest["files"] = {name: {"sha256": sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
                             for name in (SAFETENSORS, STATE_DICT)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        for name in (SAFETENSORS, STATE_DICT, MANIFEST):
            _finish(tmp / name, _file_mode())
        if out.exists():
            os.replace(out, old)  # an empty folder, or an export that check_out let go
        os.replace(tmp, out)
    finally:
        if old.exists() and not out.exists():  # the new export never got in: the old one goes back
            os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def export(source, out, *, weights: str = "auto", overwrite: bool = False) -> dict:
    """Export a run folder's checkpoint.pt or a checkpoint file to `out`; returns model.json."""
    from ffcv_imagenet.checkpoint import CheckpointError, load_checkpoint
    from ffcv_imagenet.models import create_model

    path = find_checkpoint(source)
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    chosen, state = pick_weights(checkpoint, path, weights)
    try:
        manifest = build_manifest(checkpoint, path, chosen)
    except KeyError as e:  # a config saved by a version that lacked a key
        raise ExportError(f"{path}: the checkpoint's config has no {e}") from None
    model = create_model(manifest["arch"], num_classes=manifest["num_classes"], **manifest["model_options"])
    mapping = key_map(model, manifest)
    if set(state) != set(mapping):  # an arch or option the config does not describe
        diff = sorted(set(state) ^ set(mapping))
        raise ExportError(f"{path}: the weights do not fit {manifest['arch']} with "
                          f"{manifest['model_options']} ({len(diff)} keys differ, e.g. {diff[0]})")
    write_export(Path(out), {mapping[k]: v for k, v in state.items()}, manifest, overwrite)
    return manifest


def read_manifest(folder) -> dict:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: no such file (not an ffcv-imagenet export)") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: format {manifest.get('format')!r}, this version reads {FORMAT}")
    return manifest


def load_model(folder, *, check_hash: bool = True) -> torch.nn.Module:
    """The exported model, rebuilt by `create_model` from model.json alone and loaded (strict)
    from model.safetensors, in eval mode on the CPU. ExportError names a file whose SHA-256
    differs from the one model.json recorded."""
    from safetensors.torch import load_file

    from ffcv_imagenet.models import create_model

    manifest = read_manifest(folder)
    weights = Path(folder) / SAFETENSORS
    if check_hash and sha256(weights) != manifest["files"][SAFETENSORS]["sha256"]:
        raise ExportError(f"{weights}: SHA-256 differs from the one in {Path(folder) / MANIFEST}")
    model = create_model(manifest["arch"], num_classes=manifest["num_classes"], **manifest["model_options"])
    ours = {exported: key for key, exported in key_map(model, manifest).items()}
    state = load_file(weights)
    model.load_state_dict({ours.get(k, k): v for k, v in state.items()}, strict=True)
    return model.eval()


COMMAND = Command("export", "export", __doc__.split("\n\n")[0].split(": ", 1)[-1], {
    "out": Option(str, "", "folder to write model.safetensors, model.pt and model.json into",
                  required=True, path=True),
    "weights": Option(str, "auto", "which weights: the run's weight average (ema), the model, or "
                      "auto (ema when the run kept one)", choices=WEIGHTS),
    "overwrite": Option(bool, False, "replace an earlier export in export.out"),
}, positional=Positional("source", "RUN_OR_CHECKPOINT", "a run folder (its checkpoint.pt) or a checkpoint file"))


def summary(manifest: dict, out) -> str:
    val = manifest["val"]
    accuracy = val.get("why_none")
    if val["top_1"] is not None:
        accuracy = f"top-1 {100 * val['top_1']:.2f}% (logged after epoch {val['epoch']})"
    lines = [f"exported {manifest['arch']} ({manifest['weights']} weights, {manifest['num_classes']} classes, "
             f"epoch {manifest['epochs_done']}) to {out}: {accuracy}"]
    lines += [f"  loads into {e['library']}: {e['call']}" for e in manifest["loads_into"]]
    lines += [f"  not into {reason}" for reason in manifest["does_not_load_into"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    try:
        args = COMMAND.parse(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        return COMMAND.refuse(e)
    try:
        manifest = export(args.source, args.out, weights=args.weights, overwrite=args.overwrite)
    except (ValueError, OSError) as e:  # ExportError, and create_model's for an unknown arch
        print(f"ffcv-imagenet export: {e}", file=sys.stderr)
        return 2
    print(summary(manifest, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
