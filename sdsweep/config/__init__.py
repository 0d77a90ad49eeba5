"""Configuration: typed schemas (schema, methods), derived values (resolve), value rules (validate),
building a validated Config (load, compose) and sweep constraints (constraints)."""
