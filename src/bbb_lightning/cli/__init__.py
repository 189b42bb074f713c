"""What the command line needs before a task runs: the overrides checked against the real
config (:mod:`.command_line`), the composed config validated by key (:mod:`.config_checks`,
:mod:`.component_checks`), and user errors turned into one line (:mod:`.config_terms`)."""

from . import resolvers  # noqa: F401  (registers the resolvers the configs use)
