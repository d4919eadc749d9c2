"""One module per `python -m engines` subcommand."""
