"""The studio web app: Gradio over the studio's verbs (the only package that imports gradio).

``studio serve`` calls `studio.app.server.start`; the buttons call `studio.app.services`, which
composes the verbs the CLI calls. See server.py for the queue and the safety rules.
"""
