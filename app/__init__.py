"""The playground web app: a Gradio page over the engines/ package (`python -m app`, or app/space.py on Spaces)."""
