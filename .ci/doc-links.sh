#!/usr/bin/env bash
# Every relative link in the repository's Markdown must resolve: the file (or directory)
# exists, and a `#anchor` names a heading of the target page (GitHub's slugs: lower case,
# punctuation dropped, spaces to hyphens). External links (http, mailto) are not checked.
# Usage: .ci/doc-links.sh   (from anywhere; exit 1 and one line per broken link)
set -euo pipefail
cd "$(dirname "$0")/.."
export LC_ALL=C
# The heading slugs of one Markdown file, outside fenced code blocks.
slugs() {
  awk '/^```/ { fence = !fence; next } !fence && /^#+ / { sub(/^#+ +/, ""); print }' "$1" |
    tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9 _-]//g; s/ /-/g'
}
# The Markdown files: git's (tracked and new, not ignored), or every one outside target/.
md_files() {
  git ls-files --cached --others --exclude-standard '*.md' 2>/dev/null ||
    find . -name '*.md' -not -path './target/*' -not -path './fuzz/target/*' | sed 's|^\./||'
}
bad=0
while IFS= read -r md; do
  dir=$(dirname "$md")
  # Inline links outside fenced code blocks: ](target) with no space in the target.
  while IFS= read -r target; do
    case "$target" in http://* | https://* | mailto:*) continue ;; esac
    path=${target%%#*}
    anchor=""
    [[ "$target" == *"#"* ]] && anchor=${target#*#}
    if [ -z "$path" ]; then file=$md; else file="$dir/$path"; fi
    if [ ! -e "$file" ]; then
      echo "$md: broken link ($target): no $file"
      bad=1
    elif [ -n "$anchor" ] && ! slugs "$file" | grep -qxF -- "$anchor"; then
      echo "$md: broken link ($target): no heading #$anchor in $file"
      bad=1
    fi
  done < <(awk '/^```/ { fence = !fence; next } !fence' "$md" | grep -oE '\]\([^) ]+\)' | sed -E 's/^\]\(//; s/\)$//')
done < <(md_files)
exit "$bad"
