"""``llavakit plugins``: every registered component by kind, with its provider, and every failed plugin."""

from __future__ import annotations

import argparse
import os

from llavakit.registry.plugins import KIND_LABELS, get_registry


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("plugins", help="list registered components and plugin failures")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    registry = get_registry()
    allowed = os.environ.get("LLAVAKIT_PLUGINS")
    if allowed is not None:
        print(f"Third-party plugins limited to LLAVAKIT_PLUGINS={allowed!r}\n")
    print("Plugins loaded:")
    for info in registry.plugins:
        print(f"  {info.plugin:<36} {info.distribution} {info.version}")
    for kind, label in KIND_LABELS.items():
        names = registry.names(kind)
        print(f"\n{label.capitalize()}s ({len(names)}):")
        for name in names:
            spec = registry.get(kind, name)
            notes = ", ".join(f"{k}={v}" for k, v in spec.metadata.items() if k in ("attention", "chat_template"))
            extra = f" [{notes}]" if notes else ""
            print(f"  {name:<28} {spec.provider:<28} {spec.description}{extra}")
    duplicated = sorted(f"{KIND_LABELS[k]} {n!r}" for k, n in registry.duplicates)
    if duplicated:
        print("\nUnusable names (registered twice): " + ", ".join(duplicated))
    if registry.failures:
        print(f"\nFailed plugins ({len(registry.failures)}):")
        for failure in registry.failures:
            print(f"  {failure.plugin} ({failure.distribution} {failure.version}): {failure.error}")
        print("The other plugins work. LLAVAKIT_STRICT_PLUGINS=1 makes such failures raise; LLAVAKIT_PLUGINS=a,b "
              "limits which third-party plugins load.")
    else:
        print("\nFailed plugins: none")
    return 0
