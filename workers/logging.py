"""structlog set-up, done once at process start."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(*, level: str = "info", json: bool | None = None) -> None:
    """Route structlog and stdlib records (aiokafka's, torch's, Python warnings) to stderr
    through one renderer: JSON unless stderr is a terminal."""
    use_json = not sys.stderr.isatty() if json is None else json
    numeric_level = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries log through the stdlib: render their records with the same processors, so a
    # JSON log never has a plain `ERROR:aiokafka:...` line in the middle of it.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric_level, logging.WARNING))
    # torch installs handlers of its own on its loggers at import; let them propagate instead.
    for name in list(logging.root.manager.loggerDict):
        if name == "torch" or name.startswith("torch."):
            library_logger = logging.getLogger(name)
            library_logger.handlers.clear()
            library_logger.propagate = True
    logging.captureWarnings(True)
