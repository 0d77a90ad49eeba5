"""Stable Diffusion components: loading from the hub or a folder (loading), prompt tokens (tokens), and the
offline models sdsweep builds itself: the random tiny model (tiny) and the pretrained shapes world
(shapes, shapes_build).
"""
