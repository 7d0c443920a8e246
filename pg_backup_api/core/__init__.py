"""What every layer may use: the operation model, errors, ids, atomic files, reloading."""
