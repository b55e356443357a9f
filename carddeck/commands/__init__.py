"""Every ``carddeck`` subcommand, one module each, and the dispatcher (:mod:`carddeck.commands.cli`).

Commands sit on top: they may import any package; no library package imports a command."""
