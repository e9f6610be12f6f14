"""``nnunetv2_ohem_phantoms``: write MNI152-based phantoms in a challenge's own folder layout, ready for
``nnunetv2_ohem_convert``.

    nnunetv2_ohem_phantoms msseg2 /data/msseg2_phantoms -n 20 --extra 5 --voxel_size 2
    nnunetv2_ohem_phantoms valdo  /data/valdo_phantoms  -n 20 --set n_lacunes=3,15 --set voxel_size=1.5
    nnunetv2_ohem_phantoms brats  /data/brats_phantoms  -n 20 --year 2023
    nnunetv2_ohem_phantoms valdo  --show_config          # every --set field with its default

``--set FIELD=VALUE`` overrides any field of the generator's config dataclass (ranges as ``LO,HI``); unknown
fields and bad values are errors that name the field.
"""
import argparse
import dataclasses
import importlib
import json
import sys
from typing import Any, Dict, List, Optional, Sequence

from nnunetv2_ohem.cli_common import EXIT_USAGE, HelpFormatter, add_deprecated_alias, positive_int, show_progress
from nnunetv2_ohem.atomic import OutputExistsError

#: kind -> (module, config class, writer, keyword of the writer's extra split, what the extra cases are)
GENERATORS: Dict[str, tuple] = {
    "msseg2": ("nnunetv2_ohem.phantoms.mni", "MSSEG2PhantomConfig", "write_msseg2_phantoms", "n_test",
               "held-out subjects in testing/ (with ground truth)"),
    "valdo": ("nnunetv2_ohem.phantoms.valdo", "VALDOPhantomConfig", "write_valdo_phantoms", "n_unlabelled",
              "subjects without a rater mask (go to imagesTs)"),
    "brats": ("nnunetv2_ohem.phantoms.brats", "BraTSPhantomConfig", "write_brats_phantoms", "n_validation",
              "validation cases without seg (go to imagesTs)"),
}


def _parse_value(text: str, default: Any, field: str) -> Any:
    """Parse ``text`` to the type of the field's default (tuples as comma lists)."""
    try:
        if isinstance(default, tuple):
            parts = [p for p in text.split(",") if p.strip()]
            if len(parts) != len(default):
                raise ValueError(f"expected {len(default)} comma-separated values")
            return tuple(_parse_value(p, d, field) for p, d in zip(parts, default))
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            return text.lower() in ("true", "1")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        return type(default)(text)
    except ValueError as e:
        raise ValueError(f"--set {field}={text}: {e}") from None


def config_from_overrides(config_cls: type, overrides: Sequence[str]):
    """Build ``config_cls`` with ``FIELD=VALUE`` overrides applied to its defaults (validated by the class)."""
    defaults = config_cls()
    fields = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(config_cls)}
    values: Dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item}: expected FIELD=VALUE")
        name, text = item.split("=", 1)
        name = name.strip()
        if name not in fields:
            raise ValueError(f"--set {name}: unknown field of {config_cls.__name__}; known: {', '.join(fields)}")
        values[name] = _parse_value(text.strip(), fields[name], name)
    return dataclasses.replace(defaults, **values)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnunetv2_ohem_phantoms", formatter_class=HelpFormatter,
                                description="Write MNI152-based phantoms in a challenge's own folder layout, "
                                            "ready for nnunetv2_ohem_convert.",
                                epilog=__doc__.split("\n\n", 1)[1].replace("``", ""))
    p.add_argument("kind", choices=sorted(GENERATORS), help="the challenge layout: %(choices)s")
    p.add_argument("out", nargs="?", help="output folder (must not exist unless --overwrite)")
    p.add_argument("-n", "--subjects", type=positive_int, default=10, help="labelled training subjects")
    p.add_argument("--extra", type=int, default=0,
                   help="extra cases: msseg2 held-out testing/ subjects with ground truth; valdo subjects "
                        "without a rater mask; brats validation cases without seg")
    p.add_argument("--seed", type=int, default=0, help="same seed and options give the same bytes")
    p.add_argument("--voxel_size", type=float, default=None, help="isotropic voxel size in mm (shortcut for "
                                                                    "--set voxel_size=V; larger is faster)")
    p.add_argument("--year", type=int, choices=(2020, 2021, 2023), default=None,
                   help="brats only: the release whose names and label values to write (default 2021)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a generator config field (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing phantom set (a folder with a "
                                                             "phantom_manifest.json of these generators)")
    p.add_argument("--show_config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--no_progress", action="store_true", help="no progress bar (also off when stderr is not a "
                                                              "terminal)")
    for old, new in (("--voxel-size", "--voxel_size"), ("--show-config", "--show_config"),
                     ("--no-progress", "--no_progress")):
        add_deprecated_alias(p, old, new)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Console script: Ctrl-C / SIGTERM remove the temporary folder and exit 130 / 143 with one line."""
    from nnunetv2_ohem.cli_common import run_cli

    return run_cli("nnunetv2_ohem_phantoms", phantoms_main, argv)


def phantoms_main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, config_name, writer_name, extra_kw, _ = GENERATORS[args.kind]
    module = importlib.import_module(module_name)
    overrides = list(args.overrides) + ([f"voxel_size={args.voxel_size}"] if args.voxel_size is not None else [])
    try:
        config = config_from_overrides(getattr(module, config_name), overrides)
        if args.show_config:
            print(json.dumps(dataclasses.asdict(config), indent=1))
            return 0
        if not args.out:
            raise ValueError("the output folder is required")
        if args.year is not None and args.kind != "brats":
            raise ValueError("--year applies to brats phantoms only")
        kwargs = {"n_subjects": args.subjects, "seed": args.seed, "config": config, "overwrite": args.overwrite,
                  "progress": show_progress(args.no_progress), extra_kw: args.extra}
        if args.kind == "brats":
            kwargs["year"] = args.year or 2021
        out = getattr(module, writer_name)(args.out, **kwargs)
    except OutputExistsError:
        raise   # its own one-line message (overwrite refused)
    except FileExistsError:
        print(f"nnunetv2_ohem_phantoms: error: {args.out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 1
    except ValueError as e:  # a bad option value (--set, --year): a usage error
        print(f"nnunetv2_ohem_phantoms: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"Wrote {args.subjects} + {args.extra} {args.kind} phantom subjects to {out} "
          f"(manifest: {out}/phantom_manifest.json). Next: nnunetv2_ohem_convert {args.kind} {out} -d <ID>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
