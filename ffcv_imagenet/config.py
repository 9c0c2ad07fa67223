"""Training configuration: sections declared with fastargs, loaded strictly from YAML presets and CLI.

The sections and keys are those ffcv-imagenet users already type (`--lr.lr=1.7`,
`--training.epochs=16`), plus what this engine adds. Loading is strict, unlike the reference
recipe, whose presets carried keys that were silently ignored:

- an unknown section or key, in a YAML file or on the command line, is an error naming it and the
  nearest valid key (difflib);
- a value of the wrong type or out of range is an error naming the key and the value.

A preset may start from shared values with a top-level `base: _base.yaml` (a path, or a list of
paths, relative to the preset); bases are merged recursively, the preset's own values win.

`load_config(argv)` returns a plain nested dict `{section: {key: value}}` with every declared key
filled in (plus `meta: {config_file, argv}`); the engine passes values from it down as plain
arguments. Nothing is declared at import time: `declare()` builds a fresh fastargs `Config`.
"""

import difflib
import json
import os
import sys

import yaml
from fastargs import Config, Param, Section
from fastargs.validation import Checker


# --------------------------------------------------------------------------- checkers
# fastargs' own checkers are lenient (bool("0") is True, int(3.7) is 3); these are strict and
# accept both YAML values and the strings that arrive from the command line.

class StrictInt(Checker):
    def __init__(self, min=None, max=None):
        self.min, self.max = min, max

    def check(self, value):
        if isinstance(value, bool):
            raise ValueError("expected an integer, got a boolean")
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError("expected an integer")
            value = int(value)
        elif isinstance(value, str):
            value = int(value.strip())
        elif not isinstance(value, int):
            raise ValueError("expected an integer")
        _check_range(value, self.min, self.max)
        return value

    def help(self):
        return "int" + _range_help(self.min, self.max)


class StrictFloat(Checker):
    def __init__(self, min=None, max=None, min_exclusive=False):
        self.min, self.max, self.min_exclusive = min, max, min_exclusive

    def check(self, value):
        if isinstance(value, bool):
            raise ValueError("expected a number, got a boolean")
        if isinstance(value, str):
            value = float(value.strip())
        elif isinstance(value, (int, float)):
            value = float(value)
        else:
            raise ValueError("expected a number")
        if value != value:
            raise ValueError("NaN is not allowed")
        if self.min_exclusive and self.min is not None and value <= self.min:
            raise ValueError(f"must be > {self.min}")
        _check_range(value, self.min, self.max)
        return value

    def help(self):
        if self.min_exclusive and self.min is not None:
            return f"float (> {self.min})"
        return "float" + _range_help(self.min, self.max)


def parse_bool(value) -> bool:
    """The one bool parser of every command (train keys, writer options): True/False, 0/1, and
    the strings 1/true/yes/on and 0/false/no/off; anything else (the empty string included) is a
    ValueError."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = value.strip().lower() if isinstance(value, str) else None
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 0/1 or true/false")


class StrictBool(Checker):
    def check(self, value):
        return parse_bool(value)

    def help(self):
        return "bool (0/1)"


class ResumeMode(StrictBool):
    """training.resume: 0, 1, or auto (resume the same run when the folder holds one)."""

    def check(self, value):
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return parse_bool(value)

    def help(self):
        return "0/1/auto"


class StrictStr(Checker):
    def check(self, value):
        if isinstance(value, (dict, list, bool)) or value is None:
            raise ValueError("expected a string")
        return str(value)

    def help(self):
        return "str"


class Choice(Checker):
    def __init__(self, *choices):
        self.choices = choices

    def check(self, value):
        if value not in self.choices:
            raise ValueError(f"expected one of {', '.join(self.choices)}")
        return value

    def help(self):
        return "one of " + "|".join(self.choices)


class IntList(Checker):
    """A list of non-negative ints: YAML list, or '30,60,80' on the command line ('' = empty)."""

    def check(self, value):
        if isinstance(value, str):
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError("expected a list of integers")
        return [StrictInt(min=0).check(v) for v in value]

    def help(self):
        return "list of ints (e.g. 30,60,80)"


def _check_range(value, low, high):
    if low is not None and value < low:
        raise ValueError(f"must be >= {low}")
    if high is not None and value > high:
        raise ValueError(f"must be <= {high}")


def _range_help(low, high):
    if low is not None and high is not None:
        return f" in [{low}, {high}]"
    if low is not None:
        return f" (>= {low})"
    if high is not None:
        return f" (<= {high})"
    return ""


# --------------------------------------------------------------------------- declaration

def declare() -> Config:
    """Declare every section and key on a fresh fastargs Config (no global state). Choice lists
    come from the modules that implement the choices."""
    from ffcv_imagenet.data import DECODERS, ORDERS
    from ffcv_imagenet.models import ACTIVATIONS, STEM_POOLS
    from ffcv_imagenet.optim import OPTIMIZERS
    from ffcv_imagenet.schedules import SCHEDULE_ALIASES, SCHEDULES

    config = Config()

    def section(name, desc, **params):
        Section(name, desc, config_descriptor=config).params(**params)

    section(
        "data", "datasets and loading",
        train_dataset=Param(StrictStr(), "train .beton (with its .meta.json beside it)", default=""),
        val_dataset=Param(StrictStr(), "val .beton (same class list as train)", default=""),
        num_workers=Param(StrictInt(min=0), "decoding threads per process; 0 = CPU cores / processes on the node", default=0),
        in_memory=Param(StrictBool(), "os_cache: keep the file in the page cache (needs the RAM for it)", default=True),
        decoder=Param(Choice(*DECODERS), "train JPEG decoder: crop_first decodes only what the crop box needs (fastest, same boxes); ffcv = stock RandomResizedCrop", default="crop_first"),
        order=Param(Choice(*ORDERS), "train sample order; quasi_random reads pages in near-sequence (for files larger than RAM)", default="random"),
    )
    section(
        "lr", "learning rate and its schedule (updated every iteration)",
        lr=Param(StrictFloat(min=0, min_exclusive=True), "peak lr (lr_scaling=none) or peak lr per 256 images (lr_scaling=linear)", default=0.5),
        lr_scaling=Param(Choice("none", "linear"), "none: lr.lr is the peak lr; linear: peak = lr.lr x global batch / 256", default="none"),
        lr_schedule_type=Param(Choice(*SCHEDULES, *SCHEDULE_ALIASES), "schedule shape (cyclic = triangular, ffcv-imagenet's name)", default="triangular"),
        lr_peak_epoch=Param(StrictFloat(min=0), "triangular: epoch of the peak", default=2.0),
        step_ratio=Param(StrictFloat(min=0, max=1), "step/step_warmup: lr multiplier at each step", default=0.1),
        step_length=Param(StrictInt(min=1), "step: epochs between steps", default=30),
        warmup_epochs=Param(StrictFloat(min=0), "step_warmup/cosine/flat_cos: linear warmup from 0 over this many epochs", default=0.0),
        milestones=Param(IntList(), "step_warmup: epochs at which lr is multiplied by step_ratio", default=[]),
        end_lr_ratio=Param(StrictFloat(min=0, max=1), "cosine/flat_cos: final lr / peak lr", default=0.0),
        flat_fraction=Param(StrictFloat(min=0, max=1), "flat_cos: fraction of the run at the peak lr before the cosine decay", default=0.72),
    )
    section(
        "resolution", "progressive resizing of train images (px)",
        min_res=Param(StrictInt(min=8), "train resolution before start_ramp", default=160),
        max_res=Param(StrictInt(min=8), "train resolution from end_ramp on", default=192),
        start_ramp=Param(StrictInt(min=0), "epoch where the ramp starts", default=65),
        end_ramp=Param(StrictInt(min=0), "epoch where the ramp ends", default=76),
    )
    section(
        "training", "optimisation, precision, checkpointing",
        epochs=Param(StrictInt(min=1), "number of epochs", default=16),
        batch_size=Param(StrictInt(min=1), "images per GPU (per process) per micro-batch", default=512),
        global_batch_size=Param(StrictInt(min=0), "images per optimizer step, all processes; 0 = batch_size x world size", default=0),
        optimizer=Param(Choice(*OPTIMIZERS), "optimizer (radam: decoupled weight decay; + lookahead_steps 6 = fast.ai's Ranger)", default="sgd"),
        momentum=Param(StrictFloat(min=0, max=1), "SGD momentum", default=0.9),
        nesterov=Param(StrictBool(), "Nesterov momentum", default=False),
        adam_beta1=Param(StrictFloat(min=0, max=1), "adamw/radam/lamb: first-moment decay", default=0.9),
        adam_beta2=Param(StrictFloat(min=0, max=1), "adamw/radam/lamb: second-moment decay", default=0.999),
        adam_eps=Param(StrictFloat(min=0), "adamw/radam/lamb: epsilon; 0 = the optimizer's default (1e-8; LAMB 1e-6)", default=0.0),
        lookahead_steps=Param(StrictInt(min=0), "Lookahead: sync slow weights every k steps; 0 = off", default=0),
        lookahead_alpha=Param(StrictFloat(min=0, max=1, min_exclusive=True), "Lookahead: slow-weight step size", default=0.5),
        ema_decay=Param(StrictFloat(min=0, max=1), "evaluate an exponential moving average of the weights with this decay per step (e.g. 0.999); 0 = off", default=0.0),
        weight_decay=Param(StrictFloat(min=0), "weight decay (not on norm layers or biases)", default=1e-4),
        label_smoothing=Param(StrictFloat(min=0, max=1), "label smoothing", default=0.1),
        use_blurpool=Param(StrictBool(), "BlurPool before strided convs", default=True),
        mixup_alpha=Param(StrictFloat(min=0), "mixup Beta(alpha, alpha); 0 = off", default=0.0),
        precision=Param(Choice("auto", "fp16", "bf16", "fp32"), "auto = bf16 on CUDA GPUs that run it natively (Ampere and later), else fp16 + GradScaler; on CPU bf16 where it is native (AVX-512), else fp32", default="auto"),
        channels_last=Param(StrictBool(), "channels-last memory format", default=True),
        compile=Param(StrictBool(), "torch.compile the model", default=False),
        sync_bn=Param(StrictBool(), "SyncBatchNorm across processes", default=False),
        resume=Param(ResumeMode(), "1: continue the run in logging.folder from its last checkpoint (or the one before it when the last cannot be read), warning about changed settings; auto: the same, but only when the folder holds the same run (refused when its settings differ), from scratch when it holds none, so that a restart (torchrun --max-restarts) continues by itself; 0: a new run, refused when the folder holds one", default="auto"),
        stop_after_s=Param(StrictFloat(min=0), "end this launch after the last epoch expected to finish within this many seconds of launch (checkpointed; the same command continues the run); 0 = run to the end", default=0.0),
        eval_only=Param(StrictBool(), "only evaluate training.checkpoint on data.val_dataset", default=False),
        checkpoint=Param(StrictStr(), "checkpoint path for eval_only", default=""),
        seed=Param(StrictInt(min=0), "seed of data order, augmentation and init", default=0),
        deterministic=Param(StrictBool(), "bitwise-reproducible runs and resumes (CPU; 1 decoding thread)", default=False),
        device=Param(Choice("auto", "cuda", "cpu"), "auto = cuda when available", default="auto"),
        cpu_threads=Param(StrictInt(min=0), "torch threads per process on CPU; 0 = CPU cores / processes on the node", default=0),
        distill_arch=Param(StrictStr(), "teacher arch for knowledge distillation; '' = off", default=""),
        distill_checkpoint=Param(StrictStr(), "teacher weights (state_dict or engine checkpoint)", default=""),
        distill_temperature=Param(StrictFloat(min=0, min_exclusive=True), "distillation temperature", default=4.0),
        distill_weight=Param(StrictFloat(min=0, max=1), "weight of the distillation term", default=0.5),
    )
    section(
        "augment", "train augmentation",
        scale_min=Param(StrictFloat(min=0, max=1, min_exclusive=True), "RandomResizedCrop area fraction, min", default=0.08),
        scale_max=Param(StrictFloat(min=0, max=1, min_exclusive=True), "RandomResizedCrop area fraction, max", default=1.0),
        ratio_min=Param(StrictFloat(min=0, min_exclusive=True), "RandomResizedCrop aspect ratio, min", default=3 / 4),
        ratio_max=Param(StrictFloat(min=0, min_exclusive=True), "RandomResizedCrop aspect ratio, max", default=4 / 3),
        color_jitter=Param(StrictFloat(min=0, max=1), "brightness/contrast/saturation jitter strength (0.4 typical); 0 = off", default=0.0),
        pca_lighting=Param(StrictFloat(min=0), "AlexNet PCA lighting noise std (0.1 typical); 0 = off", default=0.0),
    )
    section(
        "validation", "evaluation",
        batch_size=Param(StrictInt(min=1), "images per process per batch", default=256),
        resolution=Param(StrictInt(min=8), "center-crop resolution", default=256),
        crop_ratio=Param(StrictFloat(min=0, max=1, min_exclusive=True),
                         "side of the center crop / shorter image side (224/256 = ImageNet's 0.875; 1 = whole square image)",
                         default=224 / 256),
        lr_tta=Param(StrictBool(), "average logits with the horizontally flipped image", default=True),
        every_n_epochs=Param(StrictInt(min=1), "validate every n epochs (and always after the last)", default=1),
        real_labels=Param(StrictStr(), "ReaL labels of ILSVRC2012 val (real.json): also report ReaL top-1 at every validation (needs the val file's source names); '' = off", default=""),
    )
    section(
        "model", "network",
        arch=Param(StrictStr(), "torchvision classification arch", default="resnet50"),
        resnet_d=Param(StrictBool(), "ResNet-D tweak (deep stem, avg-pool shortcut)", default=False),
        activation=Param(Choice(*ACTIVATIONS), "activation of every ReLU in the network (mish: Misra 2019; silu = swish, Ramachandran et al. 2017)", default="relu"),
        stem_pool=Param(Choice(*STEM_POOLS), "ResNet stem pooling: max (3x3, stride 2) or maxblur (max stride 1, then a stride-2 binomial blur; Zhang 2019)", default="max"),
        self_attention=Param(StrictBool(), "ResNet: SimpleSelfAttention (Grankin 2019) on the residual branch of the first stage's last block", default=False),
        zero_init_residual=Param(StrictBool(), "zero-init the last BN gamma of each residual block", default=True),
        xavier_init=Param(StrictBool(), "Xavier init of convs and linear layers", default=False),
    )
    section(
        "logging", "run folder",
        folder=Param(StrictStr(), "the run folder itself (params.json, env.json, log.jsonl, checkpoint.pt)", default="runs/latest"),
        progress=Param(StrictBool(), "progress on rank 0: a bar on a terminal, a line every 30 s in a log", default=True),
        tensorboard=Param(StrictBool(), "TensorBoard event files in <folder>/tensorboard: each epoch's figures (epoch/*), per-step loss and lr (step/*); needs the tensorboard package", default=False),
        csv=Param(StrictBool(), "<folder>/epochs.csv: one row per epoch, the epoch lines of log.jsonl as a table", default=False),
        step_every=Param(StrictInt(min=1), "TensorBoard's per-step loss and lr at every this many optimizer steps (read from the device 20 steps at a time, with the non-finite check)", default=10),
    )
    return config


def _entries(config: Config) -> dict:
    """{'section.key': Param} in declaration order."""
    return {".".join(path): param for path, param in config.entries.items()}


def defaults() -> dict:
    out = {}
    for name, param in _entries(declare()).items():
        sec, key = name.split(".", 1)
        value = param.default
        out.setdefault(sec, {})[key] = list(value) if isinstance(value, list) else value
    return out


# --------------------------------------------------------------------------- loading

class ConfigError(ValueError):
    """A config problem; the message names the file, key or value at fault."""


class BareFlag(str):
    """The value of a `--section.key` given with no value: "1", which only a bool key accepts
    (`needs_value` refuses it for every other key, instead of reading it as the number 1)."""


def needs_value(name: str, value) -> None:
    """Refuse a bare flag for a key that is not a bool (call before checking a non-bool value)."""
    if isinstance(value, BareFlag):
        raise ValueError(f"--{name} needs a value (--{name}=VALUE)")


def nearest(name: str, candidates) -> "str | None":
    """The candidate closest to a mistyped `name`, or None (the one "did you mean" of every
    command): the whole dotted name first, then the key part alone ("lr.rate" -> a key like it)."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    if not close:
        key = name.split(".")[-1]
        by_key = {c.split(".")[-1]: c for c in candidates}
        close = [by_key[k] for k in difflib.get_close_matches(key, list(by_key), n=1, cutoff=0.6)]
    return close[0] if close else None


def _nearest(name: str, candidates) -> str:
    close = nearest(name, candidates)
    return f"; did you mean '{close}'?" if close else ""


def flatten(tree: dict, source: str, prefix="") -> dict:
    """Nested (or dotted) mapping -> {'section.key': value}."""
    out = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(tree).__name__}")
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, source, name + "."))
        else:
            out[name] = value
    return out


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config_file(path, _seen=()) -> dict:
    """Read a YAML (or JSON) preset, resolve `base:` includes; returns the nested raw mapping.

    Keys are not validated here (see `resolve`), so that a base may hold values a preset overrides.
    """
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError(f"{path}: 'base' includes form a cycle")
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        text = f.read()
    try:  # JSON first (YAML refuses JSON's tab indentation), then YAML
        tree = json.loads(text)
    except json.JSONDecodeError:
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    bases = tree.pop("base", None)
    if bases is None:
        return tree
    merged = {}
    for base in [bases] if isinstance(bases, str) else list(bases):
        base_path = os.path.join(os.path.dirname(path), str(base))
        merged = _merge(merged, load_config_file(base_path, _seen + (path,)))
    return _merge(merged, tree)


def resolve(values: dict, source: str = "config") -> dict:
    """Validate `{'section.key': raw}` against the declaration; returns the full nested config."""
    entries = _entries(declare())
    out = defaults()
    for name, raw in values.items():
        if name not in entries:
            raise ConfigError(f"{source}: unknown key '{name}'{_nearest(name, entries)}")
        try:
            if not isinstance(entries[name].checker, StrictBool):
                needs_value(name, raw)
            value = entries[name].checker.check(raw)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{source}: invalid value {raw!r} for '{name}' "
                              f"(expected {entries[name].checker.help()}): {e}") from None
        sec, key = name.split(".", 1)
        out[sec][key] = value
    return out


def parse_cli(argv: list, known=None, *, flags=(), positionals: list = None) -> tuple:
    """argv -> (config files, {'section.key': 'string value'}) in order of appearance; the one
    reader of every `--section.key=value` command line. `known`: the valid `--section.key` names
    for the hint on an argument that is not one (default: the training keys). `flags`: bool keys,
    which take the next argument as their value only when it reads as a bool (so that
    `--inspect.verify FILE` leaves FILE alone). `positionals`: a list that receives the arguments
    that are not options (without it they are refused)."""
    files, values = [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        following = argv[i + 1] if i + 1 < len(argv) else None
        if arg in ("--config-file", "-C") or arg.startswith("--config-file="):
            if "=" in arg:
                files.append(arg.split("=", 1)[1])
            else:
                if following is None:
                    raise ConfigError("command line: --config-file needs a path")
                files.append(following)
                i += 1
        elif arg.startswith("--") and "." in arg.split("=", 1)[0]:
            name = arg[2:]
            if "=" in name:
                name, value = name.split("=", 1)
            elif following is not None and _takes_value(following, name in flags):
                value = following
                i += 1
            else:
                value = BareFlag("1")  # a bare flag: --training.resume
            values[name] = value
        elif positionals is not None and not arg.startswith("-"):
            positionals.append(arg)
        else:
            valid = list(known) if known is not None else ["--" + n for n in _entries(declare())]
            known = ["--config-file", "--help"] + valid
            raise ConfigError(f"command line: unknown argument '{arg}'{_nearest(arg, known)}")
        i += 1
    return files, values


def _takes_value(token: str, is_flag: bool) -> bool:
    if is_flag:
        try:
            parse_bool(token)
            return True
        except ValueError:
            return False
    return not token.startswith("-") or _is_number(token)


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def help_text() -> str:
    lines = ["usage: ffcv-imagenet train [--config-file PRESET.yaml] [--section.key=value ...]", "",
             "Every key, its type, default and meaning (YAML presets use the same names, nested by section):"]
    config = declare()
    for ns, paths in config.sections_to_entries.items():
        lines.append("")
        lines.append(f"{ns[0]}: {config.sections[ns].desc}")
        for path in paths:
            param = config.entries[path]
            name = ".".join(path)
            lines.append(f"  --{name:<31} {param.checker.help():<34} default {param.default!r}")
            lines.append(f"      {param.desc}")
    return "\n".join(lines)


def load_config(argv: list) -> dict:
    """Command line (with --config-file presets) -> nested config dict; strict.

    Later files override earlier ones; the command line overrides every file.
    """
    argv = list(argv)
    if "--help" in argv or "-h" in argv:
        print(help_text())
        sys.exit(0)
    files, cli_values = parse_cli(argv)
    merged = {}
    for path in files:
        tree = load_config_file(path)
        flat = flatten(tree, path)
        resolve(flat, source=path)  # name the file in which a bad key or value sits
        merged.update(flat)
    resolve(cli_values, source="command line")
    merged.update(cli_values)
    cfg = resolve(merged)
    cfg["meta"] = {"config_file": os.path.abspath(files[-1]) if files else None, "argv": argv}
    check_consistency(cfg)
    return cfg


def check_arch_names(cfg: dict) -> None:
    """model.arch and training.distill_arch must be torchvision classification models (checked
    here so that a typo fails before the loaders' start-up, not after it)."""
    from ffcv_imagenet.models import unknown_arch_hint

    for key, arch in (("model.arch", cfg["model"]["arch"]),
                      ("training.distill_arch", cfg["training"]["distill_arch"])):
        hint = unknown_arch_hint(arch) if arch else None
        if hint is not None:
            raise ConfigError(f"{key}={arch} is not a torchvision classification model{hint}")


def check_tensorboard(cfg: dict) -> None:
    """logging.tensorboard=1 needs the tensorboard package: refused at load time, in one line
    naming it, when it cannot be imported (the import is then cached for the run's writer)."""
    from ffcv_imagenet.logger import summary_writer_class

    if cfg["logging"]["tensorboard"]:
        try:
            summary_writer_class()
        except ImportError as e:
            raise ConfigError(str(e)) from None


def check_consistency(cfg: dict) -> None:
    """Relations between keys that single-key checks cannot see."""
    a, r, t = cfg["augment"], cfg["resolution"], cfg["training"]
    if a["scale_min"] > a["scale_max"]:
        raise ConfigError(f"augment.scale_min={a['scale_min']} > augment.scale_max={a['scale_max']}")
    if a["ratio_min"] > a["ratio_max"]:
        raise ConfigError(f"augment.ratio_min={a['ratio_min']} > augment.ratio_max={a['ratio_max']}")
    if r["min_res"] > r["max_res"]:
        raise ConfigError(f"resolution.min_res={r['min_res']} > resolution.max_res={r['max_res']}")
    if r["start_ramp"] > r["end_ramp"]:
        raise ConfigError(f"resolution.start_ramp={r['start_ramp']} > resolution.end_ramp={r['end_ramp']}")
    if t["eval_only"]:
        if not t["checkpoint"]:
            raise ConfigError("training.eval_only=1 needs --training.checkpoint=PATH")
        if not cfg["data"]["val_dataset"]:
            raise ConfigError("training.eval_only=1 needs --data.val_dataset=PATH")
    else:
        for key in ("train_dataset", "val_dataset"):
            if not cfg["data"][key]:
                raise ConfigError(f"data.{key} is not set (a .beton path)")
    check_arch_names(cfg)
    check_tensorboard(cfg)
    if t["nesterov"] and t["optimizer"] != "sgd":
        raise ConfigError(f"training.nesterov=1 applies to training.optimizer=sgd only, got "
                          f"training.optimizer={t['optimizer']}; set --training.nesterov=0")
    for key in ("adam_beta1", "adam_beta2", "ema_decay"):
        if t[key] >= 1:
            raise ConfigError(f"training.{key} must be < 1, got {t[key]}")
    if t["distill_arch"] and not t["distill_checkpoint"]:
        raise ConfigError("training.distill_arch is set but training.distill_checkpoint is empty")
    if not t["eval_only"]:
        check_schedule(cfg)


def check_schedule(cfg: dict) -> None:
    """Ask the schedule itself whether its keys fit the run (lr.lr_peak_epoch <= training.epochs,
    increasing milestones, ...), so that a bad pair fails at load time, not at the first step."""
    from ffcv_imagenet.schedules import lr_from_config

    lr, epochs = cfg["lr"], cfg["training"]["epochs"]
    try:
        lr_from_config(0.0, cfg, peak_lr=lr["lr"])
    except ValueError as e:
        raise ConfigError(f"lr.lr_schedule_type={lr['lr_schedule_type']} with training.epochs={epochs}: "
                          f"{e} (keys of section 'lr')") from None


def main(argv=None) -> int:
    """`python -m ffcv_imagenet.config --config-file X.yaml` prints the resolved config."""
    import json

    argv = sys.argv[1:] if argv is None else argv
    print(json.dumps(load_config(argv), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
