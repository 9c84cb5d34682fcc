"""``moe-serve``'s command line before Hydra reads it: a bare checkpoint directory is ``model.path=DIR`` (as in
``vllm serve DIR``), and a key or preset that does not exist fails with one line that says what was meant::

    moe-serve /ckpt/Qwen3-30B-A3B server.port=9000     # = moe-serve model.path=/ckpt/Qwen3-30B-A3B server.port=9000
    moe-serve engine.max_num_seq=8
    moe-serve: error: engine.max_num_seq is not a config key: did you mean engine.max_num_seqs?

Overrides that add (``+key``) or delete (``~key``) keys, Hydra's own (``hydra.*``, ``hydra/launcher=``) and
anything the override grammar does not parse are left to Hydra.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from pathlib import Path

from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.errors import HydraException

from serve.launch.schema import GROUPS, MoEServeSchema

_PLAIN = re.compile(r"^[\w./~:+-]+$")  # a path Hydra's grammar takes unquoted


class UsageError(ValueError):
    """A command-line mistake, printed as one ``moe-serve: error:`` line."""


def schema_keys(schema: type = MoEServeSchema, prefix: str = "") -> list[str]:
    """Every dotted key of the config (``engine.max_num_seqs``, ``launcher.extra_args``, ...)."""
    keys = []
    for f in dataclasses.fields(schema):
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):  # a nested node
            keys += schema_keys(f.default_factory, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def presets(config_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def rewrite(argv: list[str], config_dir: Path) -> list[str]:
    """``argv`` (without the program) with a bare directory turned into ``model.path=...``; :class:`UsageError`
    for a bare word that is not a path, a second one, or an override naming no key or preset."""
    args = get_args_parser().parse_known_args(argv)[0]
    bare = [o for o in args.overrides if "=" not in o]
    if len(bare) > 1:
        raise UsageError(f"one checkpoint directory at most (got {', '.join(map(repr, bare))}); everything else is "
                         "key=value")
    out = list(argv)
    if bare:  # a path: an existing directory or a word with a "/" (a missing one fails as model.path later)
        if not (Path(bare[0]).is_dir() or os.sep in bare[0]):
            raise UsageError(f"{bare[0]!r} is neither a key=value override nor a checkpoint directory (a bare "
                             "argument is served as model.path)")
        # absolute, but not through symlinks: the directory's name is the served model's name
        out[_position(argv, bare[0])] = "model.path=" + _quoted(os.path.abspath(bare[0]))
    check_overrides([o for o in args.overrides if "=" in o], config_dir)
    return out


def check_overrides(overrides: list[str], config_dir: Path) -> None:
    """:class:`UsageError` with a "did you mean" for a key or preset the config does not have."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return  # Hydra reports grammar errors itself
    keys = schema_keys()
    for o in parsed:
        name = o.key_or_group
        if o.type != OverrideType.CHANGE or o.is_hydra_override() or o.package is not None or "/" in name:
            continue
        if name in GROUPS:
            choices = presets(config_dir, name)
            for value in _values(o):
                if value not in choices:
                    hint = "; parallel.ep_size=N sets any size" if name == "parallel" else ""
                    raise UsageError(f"{name}={value}: no such preset in configs/{name} ({', '.join(choices)})"
                                     + (_did_you_mean(value, choices, f"{name}=") or hint))
        elif name not in keys and not name.startswith("launcher.extra_args."):  # a list item
            dotted = keys if "." in name else list(GROUPS) + ["engine"]
            raise UsageError(f"{name} is not a config key" + (_did_you_mean(name, dotted, "")
                                                              or " (moe-serve --cfg job shows them)"))


def _values(o) -> list[str]:
    """The preset names an override picks (``a`` or a sweep ``a,b``); none for other sweeps (globs, ranges)."""
    value = o.value()
    items = [value] if isinstance(value, str) else getattr(value, "list", [])
    return [v for v in items if isinstance(v, str)]


def _did_you_mean(word: str, choices: list[str], prefix: str) -> str:
    """``": did you mean engine.max_num_seqs?"``: the closest choice, looked for among the keys of the same group
    first (a misspelt last part), or ``""`` when nothing is close."""
    head, _, tail = word.rpartition(".")
    in_group = [c[len(head) + 1:] for c in choices if head and c.startswith(head + ".")]
    close = [f"{head}.{m}" for m in difflib.get_close_matches(tail, in_group, n=1, cutoff=0.6)] if in_group else []
    close = close or difflib.get_close_matches(word, choices, n=1, cutoff=0.8 if prefix else 0.6)
    return f": did you mean {prefix}{close[0]}?" if close else ""


def _position(argv: list[str], token: str) -> int:
    """Index of the override ``token`` in ``argv``, skipping the values of options (``--cfg job``)."""
    takes_value = {s for a in get_args_parser()._actions if a.nargs is None for s in a.option_strings}
    for i, arg in enumerate(argv):
        if arg == token and (i == 0 or argv[i - 1] not in takes_value):
            return i
    raise AssertionError(f"{token!r} not in {argv}")


def _quoted(path: str) -> str:
    if _PLAIN.match(path):
        return path
    return "'" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"
