"""ComfyUI entry point of the NearID node pack (the code lives in nearid_nodes/ and nearid_core/)."""

if __package__:  # ComfyUI imports this folder as a package
    from .nearid_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, WEB_DIRECTORY
else:  # imported as a plain module, e.g. by pytest from a checkout whose folder name is not a valid package name
    from nearid_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, WEB_DIRECTORY

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
