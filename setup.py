"""Build hook only (metadata lives in pyproject.toml): copy the top-level prompts/ into the package.

prompts/ stays at the repository root, where users read and edit the templates; a wheel has no
repository root, so `build_py` copies the files to `refine_llm/prompt_templates/` in the build tree.
`refine_llm.prompts.PROMPTS_DIR` looks there first and falls back to the checkout's prompts/.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithPrompts(build_py):
    def run(self):
        super().run()
        dest = Path(self.build_lib) / "refine_llm" / "prompt_templates"
        dest.mkdir(parents=True, exist_ok=True)
        for f in sorted((ROOT / "prompts").glob("*.txt")):
            self.copy_file(str(f), str(dest / f.name))


setup(cmdclass={"build_py": BuildPyWithPrompts})
