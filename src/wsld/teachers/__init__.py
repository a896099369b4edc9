"""Teachers: where the teacher's logits come from (a live model or stored soft labels), and training and caching a teacher."""
