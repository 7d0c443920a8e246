"""Pure rules: request parsing and schema, the ssh command, path rules, effects, settings."""
