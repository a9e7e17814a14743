"""data_modules package."""
