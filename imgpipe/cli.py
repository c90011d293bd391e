"""The ``imgpipe`` command: one console script, subcommands loaded lazily so producers never import torch."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import click

from imgpipe import __version__
from imgpipe.errors import ConfigError

# name -> ("module:attribute" of a click command, the one-line help `imgpipe --help` shows). A command's module
# is imported only when that command runs or shows its own help, so listing commands (and a producer host's
# `imgpipe enqueue`) imports neither torch nor Celery.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo-data": (
        "imgpipe.model.cli:demo_data",
        "Write the offline demo dataset (real handwritten digits) as PNG files.",
    ),
    "train": ("imgpipe.model.cli:train", "Train or fine-tune a network on an ImageFolder tree; export a model file."),
    "evaluate": ("imgpipe.model.cli:evaluate", "Accuracy, per-class precision/recall and a confusion matrix."),
    "classify": ("imgpipe.model.cli:classify", "Classify files and folders in-process (no Redis): JSONL or CSV."),
    "model": (
        "imgpipe.model.cli:model_group",
        "Bring your own model (import), see what a model file holds (info, list).",
    ),
    "bench": ("imgpipe.bench.cli:bench", "Benchmark imgpipe against the alternatives, as ratios from one run."),
    "worker": ("imgpipe.worker.cli:worker", "Consume the queue: decode, batch, classify, write records to Redis."),
    "exporter": ("imgpipe.worker.cli:exporter", "Serve queue backlog, rate and drain time for Prometheus."),
    "enqueue": ("imgpipe.producer.cli:enqueue", "Scan folders, create a job and queue its images; prints the job id."),
    "watch": ("imgpipe.producer.cli:watch", "Streaming: queue new image files as they appear in a folder."),
    "status": ("imgpipe.producer.cli:status", "Job progress: total, done, failed, rate, ETA."),
    "results": ("imgpipe.producer.cli:results", "Export a job's records as JSONL or CSV."),
    "cancel": ("imgpipe.producer.cli:cancel", "Cancel a job: workers skip its remaining images."),
    "delete": ("imgpipe.producer.cli:delete", "Delete a job: its records, counters and pending messages."),
    "dlq": ("imgpipe.producer.dlq:dlq", "Dead-lettered messages: list, replay (after a fix) or purge."),
    "reconcile": (
        "imgpipe.producer.dlq:reconcile",
        "Send again a job's messages that a dead worker or the queue lost.",
    ),
}


# Modules of the packages that the `worker` extra installs (pyproject.toml): a command that needs one of them
# says which extra to install instead of a traceback.
WORKER_EXTRA_MODULES = frozenset({"torch", "torchvision", "PIL", "numpy", "matplotlib", "sklearn"})


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name in COMMANDS if self._available(name))

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list from the table, without importing any command's module."""
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module_name, attr = entry[0].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise _missing_extra(cmd_name, exc) from None
        command = getattr(module, attr, None)
        return command if isinstance(command, click.Command) else None

    @staticmethod
    def _available(name: str) -> bool:
        module_name = COMMANDS[name][0].split(":")[0]
        return importlib.util.find_spec(module_name) is not None

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Click's main, with every user mistake reported the one imgpipe way: ``imgpipe: error: ...``, exit 2.

        That covers click's own usage errors (a missing argument, a bad option value, an unknown command),
        ConfigError raised by a command, and an OSError naming a file the user gave (``-o /missing/dir/x.csv``).
        """
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `imgpipe` (or a group): its help
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            fail(exc.format_message() + hint)
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code if exc.exit_code != 1 else 2)
        except ConfigError as exc:
            fail(str(exc))
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        except OSError as exc:
            if exc.filename is None:
                raise
            fail(f"{exc.filename}: {exc.strerror or exc}")
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ModuleNotFoundError as exc:  # a command that imports torch only once it runs
            raise _missing_extra(ctx.invoked_subcommand or "", exc) from None


def _missing_extra(cmd_name: str, exc: ModuleNotFoundError) -> Exception:
    """One line naming the extra to install when ``exc`` is a module of the `worker` extra, else ``exc``."""
    if (exc.name or "").split(".")[0] not in WORKER_EXTRA_MODULES:
        return exc
    return ConfigError(
        f"`imgpipe {cmd_name}` needs PyTorch and the model stack ({exc.name} is not installed here): "
        "pip install 'imgpipe[worker]'"
    )


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr, ``imgpipe: error: ...``, and exit ``code`` (2: a usage or configuration error)."""
    line = " ".join(message.split())
    click.echo(f"imgpipe: error: {line}", err=True)
    sys.exit(code)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="imgpipe")
def cli() -> None:
    """imgpipe: classify images with a CNN, in-process or across Redis + Celery GPU workers.

    \b
    Try it:   imgpipe demo-data demo && imgpipe classify demo/val -o labels.jsonl
    Scale it: IMGPIPE_ALLOWED_ROOTS=DIR imgpipe worker &   (a worker reads only under these folders)
              imgpipe enqueue DIR --wait ; imgpipe results JOB -o labels.csv
    Your own images: imgpipe train DATA -o my.pt (DATA/train/<label>/, DATA/val/<label>/), then
              IMGPIPE_MODEL=my.pt imgpipe classify PHOTOS

    Settings come from IMGPIPE_* environment variables; each command's --help names its own.
    """


def main() -> None:
    from imgpipe.threads import configure_openmp

    configure_openmp()  # before any command imports torch: OpenMP reads its wait policy once, when it loads
    cli.main(prog_name="imgpipe")


if __name__ == "__main__":
    main()
