"""One module per `slsd` subcommand: a thin Typer function that parses options and calls the
library. They import the library (and torch) inside the function, so `slsd --help` and usage errors
answer in a fraction of a second."""
