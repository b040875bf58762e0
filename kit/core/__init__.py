"""What every part of the kit shares and nothing of the kit below it: the environment variables it reads (env),
its errors and their exit codes (errors), files written whole or not at all (io). Imports no other kit package."""
