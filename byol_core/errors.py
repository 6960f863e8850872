"""One base class for failures a user can fix; the CLI prints them as one line, the API as 4xx."""


class ByolError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""
