"""The Textual chat app: screens, widgets and one stylesheet."""
