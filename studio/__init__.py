"""The studio: a web page (Gradio) on port 7865 in front of the gateway, a gRPC client only."""
