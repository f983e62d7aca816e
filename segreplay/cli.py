"""The command line: parses options, builds a config, calls the library, and turns
SegreplayError into a message with a hint. The only module that imports click."""

from __future__ import annotations

import gc
import sys
from dataclasses import replace

import click

from segreplay import __version__
from segreplay.config import (
    ANONYMOUS_MODES,
    BATCH_LIMITS,
    DEFAULT_DEAD_LETTER_PATH,
    DEFAULT_RATE,
    DEFAULT_STATE_PATH,
    DEFAULT_STOP_GRACE_S,
    DEFAULT_USER_OPS_RATE,
    PAGE_MODES,
    DeleteConfig,
    DeliveryOptions,
    MappingOptions,
    RunConfig,
    parse_rate,
    parse_window_time,
    resolve_endpoint,
)
from segreplay.errors import SegreplayError, UsageError

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_REJECTED = 0, 1, 2, 3
FAKE_RATE = "3000/3"  # Braze's default /users/track limit
FAKE_USER_OPS_RATE = "20000/60"  # Braze's shared limit of the user-management endpoints


def _fail(error: SegreplayError) -> None:
    """Print a SegreplayError as `error: ...` plus its hint, and exit with its status."""
    if isinstance(error, UsageError):
        message = error.message + (f"\nHint: {error.hint}" if error.hint else "")
        raise click.UsageError(message)
    click.echo(f"error: {error.message}", err=True)
    if error.hint:
        click.echo(f"hint: {error.hint}", err=True)
    sys.exit(EXIT_FATAL)


def _state_option(command):
    return click.option(
        "--state",
        "state_path",
        envvar="SEGREPLAY_STATE",
        show_envvar=True,
        default=DEFAULT_STATE_PATH,
        show_default=True,
        metavar="PATH",
        help="State and checkpoint database.",
    )(command)


def _braze_options(permission: str):
    """--endpoint and --api-key, for a command whose key needs `permission`."""

    def decorate(command):
        command = click.option(
            "--api-key",
            envvar="BRAZE_API_KEY",
            metavar="KEY",
            show_envvar=True,
            help=f"REST API key with {permission}. Never printed or written anywhere.",
        )(command)
        return click.option(
            "--endpoint",
            envvar="BRAZE_REST_ENDPOINT",
            show_envvar=True,
            metavar="URL|INSTANCE",
            help="Braze REST endpoint: US-03, rest.iad-03.braze.com or a full URL.",
        )(command)

    return decorate


def _delivery(endpoint: str | None, api_key: str | None, rate: str,
              concurrency: int) -> DeliveryOptions:  # fmt: skip
    """Where and how fast to send, or a UsageError saying what is missing."""
    rate_requests, rate_seconds = parse_rate(rate)
    if not endpoint:
        raise UsageError(
            "no Braze endpoint",
            "pass --endpoint US-03 (your instance) or set BRAZE_REST_ENDPOINT; or add --dry-run",
        )
    if not api_key:
        raise UsageError(
            "no Braze REST API key",
            "set BRAZE_API_KEY (safer than --api-key, which shows in ps); or add --dry-run",
        )
    return DeliveryOptions(
        endpoint=resolve_endpoint(endpoint),
        api_key=api_key,
        rate_requests=rate_requests,
        rate_seconds=rate_seconds,
        concurrency=concurrency,
    )


def _suppressed(paths: tuple[str, ...]) -> frozenset[str]:
    """The users of --suppress files, by state key (`e:<userId>`, `a:<anonymousId>`)."""
    if not paths:
        return frozenset()
    from segreplay.privacy import read_ids

    return frozenset(person.key for person in read_ids((path, None) for path in paths).ids)


# What decides which lines a replay sends and as what: `import` and `inspect` take the
# same ones, so that inspect's "data points with dedupe" previews that very replay.
_MAPPING_OPTIONS = (
    click.option(
        "--pages",
        type=click.Choice(PAGE_MODES),
        default="all",
        show_default=True,
        help="Which page calls become events: all, named ones only, or none.",
    ),
    click.option(
        "--screens",
        type=click.Choice(PAGE_MODES),
        default="none",
        show_default=True,
        help="Which screen calls become events; skipped unless all or named.",
    ),
    click.option(
        "--anonymous",
        type=click.Choice(ANONYMOUS_MODES),
        default="skip",
        show_default=True,
        help="Lines without a userId: skip them, or send them as Braze user aliases.",
    ),
    click.option(
        "--update-existing-only",
        is_flag=True,
        help="Never create profiles: only update users Braze already has.",
    ),
    click.option(
        "--purchase-event-too",
        is_flag=True,
        help="Also log a custom event for a track that became purchases.",
    ),
    click.option(
        "--log-purchase-when-revenue-present",
        is_flag=True,
        help="A track with a numeric revenue and no products becomes one purchase.",
    ),
    click.option("--since", metavar="TIME", help="Only calls at or after this event time."),
    click.option("--until", metavar="TIME", help="Only calls before this event time."),
    click.option(
        "--events-allow",
        multiple=True,
        metavar="NAME",
        help="Only these custom events and purchases (repeatable).",
    ),
    click.option(
        "--events-deny",
        multiple=True,
        metavar="NAME",
        help="Never these custom events and purchases (repeatable).",
    ),
)


def _mapping_options(command):
    for option in reversed(_MAPPING_OPTIONS):
        command = option(command)
    return command


def _mapping(options: dict) -> MappingOptions:
    """MappingOptions from the options _mapping_options added (taken out of `options`)."""
    return MappingOptions(
        pages=options.pop("pages"),
        screens=options.pop("screens"),
        anonymous=options.pop("anonymous"),
        update_existing_only=options.pop("update_existing_only"),
        purchase_event_too=options.pop("purchase_event_too"),
        log_purchase_when_revenue_present=options.pop("log_purchase_when_revenue_present"),
        since=parse_window_time("--since", options.pop("since")),
        until=parse_window_time("--until", options.pop("until")),
        events_allow=frozenset(options.pop("events_allow")),
        events_deny=frozenset(options.pop("events_deny")),
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="segreplay")
def cli() -> None:
    """Replay Segment archive exports into Braze, sending only what changed.

    \b
    Rehearse with a dry run, then replay for real:
      segreplay import segment-logs/ --dry-run --diff
      segreplay import segment-logs/ --endpoint US-03   (key in BRAZE_API_KEY)
    """


@cli.command("import")
@click.argument("sources", nargs=-1, required=True)
@_braze_options("users.track")
@_state_option
@click.option("--dry-run", is_flag=True, help="Send nothing and change no state.")
@click.option("--diff", is_flag=True, help="With --dry-run: per-user changes, old -> new.")
@click.option(
    "--output",
    "output_path",
    metavar="PATH",
    help="Write every request body Braze answered, one JSON line each, exactly as sent.",
)
@click.option(
    "--dead-letter",
    "dead_letter_path",
    default=DEFAULT_DEAD_LETTER_PATH,
    show_default=True,
    metavar="PATH",
    help="Rejected lines and dropped fields, as JSON lines.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print a JSON summary on stdout (the --diff goes to stderr then).",
)
@_mapping_options
@click.option(
    "--batch-limit",
    type=click.Choice(BATCH_LIMITS),
    default="combined",
    show_default=True,
    help="per-type: 75 of each array (legacy contracts).",
)
@click.option(
    "--rate",
    default=DEFAULT_RATE,
    show_default=True,
    metavar="N/SECONDS",
    help="Client-side request budget.",
)
@click.option(
    "--concurrency",
    default=8,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Requests in flight at once.",
)
@click.option(
    "--user-ops-rate",
    default=DEFAULT_USER_OPS_RATE,
    show_default=True,
    metavar="N/SECONDS",
    help="Budget of /users/identify and /users/merge (--anonymous alias merges); Braze "
    "shares 20,000 a minute between them and /users/delete.",
)
@click.option(
    "--stop-grace",
    "stop_grace_s",
    default=DEFAULT_STOP_GRACE_S,
    show_default=True,
    type=click.FloatRange(0),
    metavar="SECONDS",
    help="On SIGINT or SIGTERM, how long to wait for answers to requests in flight.",
)
@click.option(
    "--suppress",
    multiple=True,
    metavar="FILE",
    help="Users never to send: one id a line, or a CSV with a userId and/or anonymousId "
    "column; - for stdin. Repeatable. See docs/privacy.md.",
)
@click.option(
    "--workers",
    "workers_text",
    default="1",
    show_default=True,
    metavar="N|auto",
    help="Shard processes on this machine, each with --rate / N and --user-ops-rate / N "
    "(auto: one per core); docs/scale.md.",
)
@click.option(
    "--shard",
    "shard_text",
    envvar="SEGREPLAY_SHARD",
    show_envvar=True,
    metavar="I/N",
    help="Run only shard I of N (I = auto: the job index of Kubernetes, AWS Batch or "
    "Cloud Run); give it its share of --rate and --user-ops-rate. docs/scale.md.",
)
@click.option(
    "--state-upload-every",
    "state_upload_every_s",
    default=300.0,
    show_default=True,
    type=click.FloatRange(0),
    metavar="SECONDS",
    help="With --state s3://... or gs://...: upload a snapshot of the state this often "
    "(and at the end); a crash resends what was acknowledged since. docs/scale.md.",
)
def import_command(sources, endpoint, api_key, state_path, dry_run, diff, output_path,
                   dead_letter_path, as_json, batch_limit, rate, concurrency, stop_grace_s,
                   user_ops_rate, suppress, workers_text, shard_text, state_upload_every_s,
                   **mapping_options) -> None:  # fmt: skip
    """Replay SOURCE... into Braze's /users/track.

    SOURCE is a file, a directory (read recursively in sorted order), a glob, or - for
    standard input; gzip or plain JSON lines, told apart by content.

    \b
    Examples:
      segreplay import segment-logs/ --dry-run --diff
      segreplay import segment-logs/ --endpoint US-03 --json >> replay.log
      segreplay import 'segment-logs/*/1709*' --endpoint EU-01 --since 2024-03-01
      segreplay import segment-logs/ --endpoint US-03 --suppress test-accounts.csv

    Delivery: at most 75 objects a request, up to --concurrency requests in flight within
    the --rate budget; a 429 pauses every sender until Braze's reset, 5xx and network
    errors are retried with backoff, objects Braze refuses go to the dead letter. State
    advances only on Braze's acknowledgement: after a crash, the same command resumes.
    See docs/delivery.md and docs/state.md.

    Stopping: Ctrl-C or SIGTERM stops reading, waits up to --stop-grace for answers to
    requests in flight, records them and exits 130 / 143; the same command resumes. A
    second signal stops at once.

    Privacy: users deleted with `segreplay delete` on this state, and users in a
    --suppress file, are never sent (counted skipped_deleted / skipped_suppressed).

    Exit status: 0 all delivered or deliberately skipped; 3 finished, but some lines or
    objects were rejected (see the dead-letter file); 1 stopped on a fatal error (the
    same command resumes); 2 usage error; 130 / 143 stopped by SIGINT / SIGTERM.
    """
    from segreplay.progress import ConsoleReporter
    from segreplay.stopping import StopNow, StopRequest

    try:
        mapping = _mapping(mapping_options)
        parse_rate(rate)  # a wrong --rate is an error in a dry run too
        user_ops_requests, user_ops_seconds = parse_rate(user_ops_rate, "--user-ops-rate")
        delivery = user_ops = None
        if not (dry_run or diff):  # --diff without --dry-run: RunConfig says what is wrong
            delivery = _delivery(endpoint, api_key, rate, concurrency)
            user_ops = replace(delivery, rate_requests=user_ops_requests,
                               rate_seconds=user_ops_seconds, concurrency=1)  # fmt: skip
        config = RunConfig(
            sources=tuple(sources),
            state_path=state_path,
            dry_run=dry_run,
            diff=diff,
            output_path=output_path,
            dead_letter_path=dead_letter_path,
            batch_limit=batch_limit,
            mapping=mapping,
            delivery=delivery,
            user_ops=user_ops,
            suppressed=_suppressed(suppress),
            state_upload_every_s=state_upload_every_s,
        )
        workers, config = _sharded(config, workers_text, shard_text)
    except SegreplayError as error:
        _fail(error)
    # With --json, standard output holds the summary object alone: `| jq` must work.
    reporter = ConsoleReporter(diff_out=sys.stderr if as_json else None)
    stop = StopRequest()
    try:
        with stop.installed():
            if workers > 1:
                from segreplay.workers import run_workers

                summary = run_workers(config, workers, reporter, stop, stop_grace_s)
            else:
                from segreplay.pipeline import replay_into_braze

                summary = replay_into_braze(config, reporter, stop, stop_grace_s)
    except SegreplayError as error:
        reporter.finish()
        _fail(error)
    except (KeyboardInterrupt, StopNow) as error:
        reporter.finish()
        click.echo(
            "stopped at once: every acknowledged request is in the state; requests that "
            "were in flight may be sent again (docs/state.md); run the same command to resume",
            err=True,
        )
        _exit_now(128 + getattr(error, "signum", 2))
    reporter.summary(summary, dead_letter_path, summary_dead_letters(summary))
    if as_json:
        from segreplay.jsonutil import dumps

        click.echo(dumps(summary.to_dict()).decode())
    if summary.interrupted:
        abandoned = summary.requests_abandoned
        click.echo(
            "stopped: every answered request is recorded in the state"
            + (f"; {abandoned} requests still unanswered after --stop-grace may be sent "
               "again" if abandoned else "")
            + "; run the same command to resume",
            err=True,
        )  # fmt: skip
        _exit_now(128 + stop.signum)
    sys.exit(EXIT_REJECTED if summary.had_problems else EXIT_OK)


@cli.command("delete")
@click.option(
    "--user-ids",
    multiple=True,
    metavar="FILE",
    help="userIds to delete: one a line (# comments), or a CSV with a userId, user_id or "
    "external_id column; - for stdin. Repeatable.",
)
@click.option(
    "--anonymous-ids",
    multiple=True,
    metavar="FILE",
    help="anonymousIds to delete (their segment_anonymous_id aliases): one a line, or a CSV "
    "with an anonymousId or anonymous_id column. Repeatable.",
)
@_braze_options("users.delete")
@_state_option
@click.option("--dry-run", is_flag=True, help="Print what would be deleted; send nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option(
    "--dead-letter",
    "dead_letter_path",
    default=DEFAULT_DEAD_LETTER_PATH,
    show_default=True,
    metavar="PATH",
    help="Ids Braze refused, as JSON lines.",
)
@click.option(
    "--rate",
    default=DEFAULT_USER_OPS_RATE,
    show_default=True,
    metavar="N/SECONDS",
    help="Request budget; Braze shares it between /users/delete, /users/identify and /users/merge.",
)
def delete_command(user_ids, anonymous_ids, endpoint, api_key, state_path, dry_run, as_json,
                   dead_letter_path, rate) -> None:  # fmt: skip
    """Delete people in Braze (/users/delete) and make every later import skip them.

    Ids are read from files: one a line (blank lines and # comments ignored), or a CSV
    whose header names the id column; - reads standard input. At most 50 ids a request,
    one kind of id a request. Each acknowledged id is recorded in the state as a digest,
    with its time; their stored attribute values and delivered messageIds are erased.
    A second run sends nothing for ids already deleted; a killed run resumes. Use the
    --state your imports use: a state kept in shards (--workers, --shard) is changed in
    every shard file, and a state in a bucket (s3://, gs://) is updated there.

    \b
    Examples:
      segreplay delete --user-ids deletion-requests.csv --dry-run
      segreplay delete --user-ids deletion-requests.csv --endpoint US-03
      jq -r .userId requests.jsonl | segreplay delete --user-ids - --endpoint US-03 --json

    Exit status: 0 all deleted (or already); 3 Braze refused some ids (see the dead
    letter); 1 stopped on a fatal error (the same command resumes); 2 usage error;
    130 / 143 stopped by SIGINT / SIGTERM (the request in flight is recorded first).
    See docs/privacy.md.
    """
    from segreplay.deletion import run_delete
    from segreplay.privacy import IdKind, read_ids
    from segreplay.progress import ConsoleReporter, print_delete_summary
    from segreplay.stopping import StopNow, StopRequest

    try:
        if not user_ids and not anonymous_ids:
            raise UsageError("no ids to delete", "pass --user-ids FILE and/or --anonymous-ids FILE")
        parse_rate(rate)
        delivery = None if dry_run else _delivery(endpoint, api_key, rate, concurrency=1)
        ids = read_ids(
            [(path, IdKind.USER) for path in user_ids]
            + [(path, IdKind.ANONYMOUS) for path in anonymous_ids]
        )
        config = DeleteConfig(state_path, dead_letter_path, dry_run, delivery)
    except SegreplayError as error:
        _fail(error)
    reporter = ConsoleReporter()
    stop = StopRequest()
    try:
        with stop.installed():
            summary, plan = run_delete(config, ids, reporter, stop)
    except SegreplayError as error:
        _fail(error)
    except (KeyboardInterrupt, StopNow) as error:
        click.echo(
            "stopped at once: every acknowledged deletion is in the state; "
            "run the same command to resume",
            err=True,
        )
        _exit_now(128 + getattr(error, "signum", 2))
    if dry_run and not as_json:
        for person in plan.ids:
            kind = "userId" if person.kind is IdKind.USER else "anonymousId"
            click.echo(f"would delete {kind} {person.value}")
    print_delete_summary(summary, dead_letter_path if summary.rejected else None)
    if as_json:
        from segreplay.jsonutil import dumps

        click.echo(dumps(summary.to_dict()).decode())
    if summary.interrupted:
        click.echo(
            "stopped: every acknowledged deletion is in the state; run the same command to resume",
            err=True,
        )
        _exit_now(128 + stop.signum)
    sys.exit(EXIT_REJECTED if summary.had_problems else EXIT_OK)


def _sharded(config: RunConfig, workers_text: str, shard_text: str | None):
    """(worker processes, config): `--shard I/N` makes `config` one shard's; `--workers`
    leaves sharding to run_workers. Either checks that the state is kept in N shards."""
    from segreplay.sharding import check_shard_count, parse_shard, parse_workers, shard_config

    workers = parse_workers(workers_text)
    if shard_text:
        if workers > 1:
            raise UsageError(
                "--shard (or SEGREPLAY_SHARD) and --workers do not go together",
                "run one shard per process with --shard, or N of them with --workers",
            )
        shard = parse_shard(shard_text)
        check_shard_count(config.state_path, shard.count, "--shard")
        return 1, shard_config(config, shard)
    check_shard_count(config.state_path, workers)
    return workers, config


@cli.command("inspect")
@click.argument("sources", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@_mapping_options
def inspect_command(sources, as_json, **mapping_options) -> None:
    """Tell what a replay of SOURCE... would do, without state or a request to Braze.

    Lines by type, event names, users, anonymous share, duplicate messageIds, time
    range, what the options skip (and the option that keeps it), trait keys and how
    often they change, fields that are not sent, invalid lines, and the Braze data
    points a replay would spend with and without dedupe. It takes import's options that
    change what is sent, so it previews that very replay.

    \b
    Examples:
      segreplay inspect segment-logs/ --json | jq .data_points_with_dedupe
      segreplay inspect segment-logs/ --screens all --since 2024-03-01
    """
    from segreplay.progress import print_survey
    from segreplay.reporting import SilentReporter
    from segreplay.survey import survey

    try:
        config = RunConfig(
            sources=tuple(sources),
            dry_run=True,
            mapping=_mapping(mapping_options),
        )
        result = survey(config, SilentReporter())
    except SegreplayError as error:
        _fail(error)
    if as_json:
        from segreplay.jsonutil import dumps

        click.echo(dumps(result.to_dict()).decode())
    else:
        print_survey(result)


@cli.command("fake-braze")
@click.option(
    "--port",
    default=4011,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port on 127.0.0.1 (0: any free port).",
)
@click.option(
    "--api-key",
    envvar="FAKE_BRAZE_API_KEY",
    show_envvar=True,
    default="fake-key",
    show_default=True,
    help="The key the fake accepts.",
)
@click.option(
    "--log",
    "log_path",
    metavar="PATH",
    help="Append every accepted object here, one JSON line each.",
)
@click.option(
    "--batch-limit",
    type=click.Choice(BATCH_LIMITS),
    default="combined",
    show_default=True,
    help="per-type: 75 of each array, as on legacy contracts.",
)
@click.option(
    "--rate",
    default=FAKE_RATE,
    show_default=True,
    metavar="N/SECONDS",
    help="/users/track requests allowed per window; beyond them, 429.",
)
@click.option(
    "--user-ops-rate",
    default=FAKE_USER_OPS_RATE,
    show_default=True,
    metavar="N/SECONDS",
    help="/users/delete, /users/identify and /users/merge requests allowed together.",
)
@click.option(
    "--reset-style",
    type=click.Choice(["epoch", "seconds"]),
    default="epoch",
    show_default=True,
    help="X-RateLimit-Reset as epoch seconds, or seconds left.",
)
@click.option("--rate-429", default=0.0, help="Share of requests answered 429.")
@click.option("--rate-5xx", default=0.0, help="Share answered 5xx, not processed.")
@click.option(
    "--rate-processed-5xx",
    default=0.0,
    help="Share processed, then answered 5xx (a lost acknowledgement).",
)
@click.option("--rate-drop", default=0.0, help="Share whose connection is dropped unanswered.")
@click.option(
    "--rate-processed-drop", default=0.0, help="Share processed, then dropped unanswered."
)
@click.option("--latency-ms", default=0.0, help="Delay before each answer.")
@click.option("--seed", default=0, help="Seed for the fault draws.")
def fake_braze_command(rate: str, user_ops_rate: str, **options) -> None:
    """A local stand-in for Braze's REST API, for rehearsals and tests.

    \b
    Example: a rehearsal with 5% server errors and 2% rate limiting:
      segreplay fake-braze --port 4011 --rate-5xx 0.05 --rate-429 0.02 &
      segreplay import samples/segment-logs --endpoint http://127.0.0.1:4011 \\
          --api-key fake-key
      curl -s 127.0.0.1:4011/_fake/stats
    """
    from segreplay.fake import FakeBrazeConfig, serve

    try:
        options["rate_limit"], options["rate_window_s"] = parse_rate(rate)
        requests, seconds = parse_rate(user_ops_rate, "--user-ops-rate")
        options["user_ops_rate_limit"], options["user_ops_rate_window_s"] = requests, seconds
        config = FakeBrazeConfig(**options)
    except SegreplayError as error:
        _fail(error)
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    serve(config)


@cli.command("status")
@_state_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def status_command(state_path: str, as_json: bool) -> None:
    """What the state holds: files done and partly done, last runs and their summaries.
    A state kept in shards (--workers, --shard) is shown shard by shard; with --json,
    one object: {"state": ..., "shards": [each shard's object]}.

    \b
    Example:
      segreplay status --state /var/lib/segreplay/state.sqlite
    """
    import os

    from segreplay.sharding import kept_in, shard_paths
    from segreplay.state import State

    try:
        count = kept_in(state_path)
        paths = [path for path in shard_paths(state_path, count) if os.path.exists(path)]
        if not paths:
            raise UsageError(f"{state_path}: no state file here", "pass --state PATH")
        reports = []
        for path in paths:
            state = State(path)
            try:
                reports.append(state.report())
            finally:
                state.close()
    except SegreplayError as error:
        _fail(error)
    sharded = count > 1
    if as_json:
        from segreplay.jsonutil import dumps

        whole = {"state": state_path, "shards": reports} if sharded else reports[0]
        click.echo(dumps(whole).decode())
        return
    from segreplay.progress import print_status

    if sharded:
        missing = count - len(paths)
        never_run = f" ({missing} of them not made yet: never run)" if missing else ""
        click.echo(f"state {state_path} is kept in {count} shards{never_run}")
    for report in reports:
        print_status(report)


@cli.command("reset")
@_state_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def reset_command(state_path: str, yes: bool) -> None:
    """Forget what the state holds, to replay from scratch; deleted users are kept.

    The next import resends every event and attribute: Braze keeps every event it
    receives, so events already delivered will be stored twice. Use it only for a fresh
    workspace (or after deleting the users in Braze). Users deleted with `segreplay
    delete` stay recorded, so that no replay brings them back.

    \b
    Example:
      segreplay reset --state segreplay-state.sqlite
    """
    import os
    from contextlib import ExitStack

    from segreplay.sharding import kept_in, shard_paths
    from segreplay.state import State, StateLock

    try:
        count = kept_in(state_path)
    except SegreplayError as error:
        _fail(error)
    paths = [path for path in shard_paths(state_path, count) if os.path.exists(path)]
    if not paths:
        raise click.UsageError(f"{state_path}: no state file here\nHint: pass --state PATH")
    where = state_path if count == 1 else f"{state_path} (all {count} shards)"
    if not yes:
        click.confirm(
            f"Forget every delivered event and attribute recorded in {where}? The next "
            "import resends all of them (deleted users stay recorded)",
            abort=True,
        )
    try:
        with ExitStack() as stack:
            for path in paths:  # every shard locked first: none is reset while one runs
                stack.enter_context(StateLock(path))
            for path in paths:
                state = State(path)
                try:
                    state.reset()
                finally:
                    state.close()
    except SegreplayError as error:
        _fail(error)
    click.echo(f"{where}: reset; the next import starts from scratch")


@cli.command("reshard")
@click.option(
    "--shards",
    "count",
    required=True,
    type=click.IntRange(1, 1024),
    help="The number of shards to keep the state in (1: one file).",
)
@_state_option
def reshard_command(count: int, state_path: str) -> None:
    """Redistribute a sharded state to M shards, offline, before a run with --workers M
    or --shard I/M.

    Users move to their new shard; delivered messageIds are copied into every new
    shard; a file's checkpoint is kept at the least progress of the old shards (or
    dropped, to be read again, where they disagree). Nothing is sent twice afterwards.
    Refused while any shard is in use.

    \b
    Example: from --workers 2 to --workers 3
      segreplay reshard --shards 3 --state segreplay-state.sqlite
    """
    from segreplay.resharding import reshard

    try:
        result = reshard(state_path, count)
    except SegreplayError as error:
        _fail(error)
    click.echo(
        f"{state_path}: {result.old_count} shards -> {result.new_count}: {result.users:,} "
        f"users, {result.digests:,} delivered messageIds in each shard, "
        f"{result.files_kept:,} file checkpoints kept, {result.files_dropped:,} files to "
        "read again"
    )


def _exit_now(status: int) -> None:
    """Exit without joining worker threads still waiting on an answer: the state is
    closed, and a stop must not outlast its grace period."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def summary_dead_letters(summary) -> int:
    return (
        summary.invalid
        + summary.rejected
        + summary.fields_dropped
        + summary.files_skipped
        + summary.files_truncated
    )


def main() -> None:
    # A replay allocates millions of short-lived dicts and keeps few: collecting the
    # young generation every 700 allocations cost a third of the run time.
    gc.set_threshold(100_000, 50, 1000)
    cli(prog_name="segreplay")
