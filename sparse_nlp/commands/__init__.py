"""Sub-commands of the ``sparse-nlp`` CLI, one module each with ``add_parser(subparsers)`` and ``run(args)``."""
