"""One readable function per subcommand; the only place specs become core objects."""
