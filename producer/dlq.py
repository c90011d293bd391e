"""`imgpipe dlq list|replay|purge` and `imgpipe reconcile JOB` (no torch; Celery only when sending)."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from imgpipe import defaults
from imgpipe.settings import Settings, setting_option

redis_url_option = setting_option("REDIS_URL")


def _client(redis_url: str | None) -> tuple[Settings, Any]:
    from imgpipe.broker import redis_client

    settings = Settings.from_env(sections=("redis",), overrides={"redis_url": redis_url})
    return settings, redis_client(settings.redis)


def _sender(settings: Settings, client: Any) -> Any:
    from imgpipe.broker import publish
    from imgpipe.jobs import job_queue
    from imgpipe.producer.enqueue import producer_app

    app = producer_app(settings.redis)

    def send(job_id: str, paths: list[str], message_id: str) -> None:  # to the job's queue (pinned: its model's)
        publish(app, job_id, paths, message_id, queue=job_queue(client, job_id, settings.redis.queue))

    return send


@click.group()
def dlq() -> None:
    """Dead-lettered messages: list them, send them again once their cause is fixed, or drop them."""


@dlq.command("list")
@click.option("--job", "job_id", help="Only this job's dead letters.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per dead letter.")
@redis_url_option
def list_(job_id: str | None, as_json: bool, redis_url: str | None) -> None:
    """List dead letters (oldest first): job, message, images, deliveries, reason."""
    from imgpipe.deadletters import entries

    _, client = _client(redis_url)
    for _, entry in entries(client, job_id):
        if as_json:
            click.echo(json.dumps(entry))
        else:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(entry.get("at", 0))))
            click.echo(
                f"{entry['job']}  {entry['message_id']}  {len(entry['paths'])} images  "
                f"{entry.get('deliveries', '?')} deliveries  {when}  {entry.get('reason', '')}"
            )


@dlq.command()
@click.option("--job", "job_id", help="Only this job's dead letters.")
@redis_url_option
def replay(job_id: str | None, redis_url: str | None) -> None:
    """Send dead letters again (fresh delivery count); their images' dead_letter records are replaced."""
    from imgpipe.deadletters import replay as replay_entries

    settings, client = _client(redis_url)
    messages, images = replay_entries(client, _sender(settings, client), settings.redis.result_ttl_days * 86400, job_id)
    click.echo(f"imgpipe: sent {messages} dead-lettered messages again ({images} images)", err=True)


@dlq.command()
@click.option("--job", "job_id", help="Only this job's dead letters.")
@redis_url_option
def purge(job_id: str | None, redis_url: str | None) -> None:
    """Drop dead letters (their images keep their dead_letter records)."""
    from imgpipe.deadletters import purge as purge_entries

    _, client = _client(redis_url)
    click.echo(f"imgpipe: removed {purge_entries(client, job_id)} dead letters", err=True)


@click.command()
@click.argument("job_id", metavar="JOB")
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=defaults.LOST_GRACE_S,
    show_default=True,
    help="Seconds a message may stay unleased behind the queue's oldest before it counts as lost.",
)
@redis_url_option
def reconcile(job_id: str, grace: float, redis_url: str | None) -> None:
    """Send again JOB's messages whose worker died (expired lease) or that the queue lost (now, by hand)."""
    from imgpipe.jobs import job_status
    from imgpipe.leases import Reconciler

    settings, client = _client(redis_url)
    job_status(client, job_id)  # ConfigError if there is no such job
    counts = Reconciler(client, settings.redis.queue, _sender(settings, client), grace_s=grace).run_once(job_id)
    click.echo(
        f"imgpipe: job {job_id}: sent {counts['expired']} messages of stopped workers and {counts['lost']} lost "
        "messages again",
        err=True,
    )
