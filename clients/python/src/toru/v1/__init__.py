"""Generated from proto/toru/v1 by clients/generate.sh. Do not edit."""
