"""The ``imgpipe`` command: one console script, subcommands loaded lazily so producers never import torch."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import click

from imgpipe import __version__
from imgpipe.errors import ConfigError

# name -> "module:attribute" of a click command. Loaded only when named (or listed by --help), so
# `imgpipe enqueue` on a producer host imports neither torch nor the worker.
COMMANDS: dict[str, str] = {
    "demo-data": "imgpipe.model.cli:demo_data",
    "train": "imgpipe.model.cli:train",
    "evaluate": "imgpipe.model.cli:evaluate",
    "classify": "imgpipe.model.cli:classify",
    "bench": "imgpipe.bench.cli:bench",
    "worker": "imgpipe.worker.cli:worker",
    "exporter": "imgpipe.worker.exporter:exporter",
    "enqueue": "imgpipe.producer.cli:enqueue",
    "watch": "imgpipe.producer.cli:watch",
    "status": "imgpipe.producer.cli:status",
    "results": "imgpipe.producer.cli:results",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name in COMMANDS if self._available(name))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name in ("torch", "torchvision"):
                raise click.ClickException(
                    f"`imgpipe {cmd_name}` needs PyTorch, which is not installed here: pip install 'imgpipe'"
                ) from None
            raise
        command = getattr(module, attr, None)
        return command if isinstance(command, click.Command) else None

    @staticmethod
    def _available(name: str) -> bool:
        module_name = COMMANDS[name].split(":")[0]
        return importlib.util.find_spec(module_name) is not None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            # A user mistake: one clear line, exit 2, no traceback.
            click.echo(f"imgpipe: error: {exc}", err=True)
            ctx.exit(2)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="imgpipe")
def cli() -> None:
    """imgpipe: classify images with a CNN, in-process or across Redis + Celery GPU workers.

    \b
    Try it:   imgpipe demo-data demo && imgpipe classify demo/val -o labels.jsonl
    Scale it: imgpipe worker & ; imgpipe enqueue DIR --wait ; imgpipe results JOB -o labels.csv

    Settings come from IMGPIPE_* environment variables; each command's --help names its own.
    """


def main() -> None:
    cli.main(prog_name="imgpipe")


if __name__ == "__main__":
    main()
