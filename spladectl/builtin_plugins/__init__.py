"""Built-in plugins. Each is registered by spladectl.plugins exactly as an installed package would be."""
