# cloudcfg.awk: parse the small YAML subset used by NoCloud meta-data and
# #cloud-config user-data (as emitted by PyYAML safe_dump, block style) and
# write every scalar it finds as a file under OUT (awk -v OUT=dir):
#   top-level scalar        key: value        -> OUT/key
#   item N of a list        key:\n- value     -> OUT/key.NNN   (000, 001, ...)
#   entry of a nested map   key:\n  sub: v    -> OUT/key.sub
# Scalars may be plain (also folded over several more-indented lines),
# 'single quoted' or "double quoted" (both possibly multi-line, with YAML
# line folding), or block scalars (| or >, with -/+ chomping).
# Keys are restricted to [A-Za-z0-9_.-]; anything else is ignored.
# Flow collections ([a, b] / {a: b}) are supported for one-line lists of
# plain or quoted scalars only.
function indent_of(s) { match(s, /^ */); return RLENGTH }
function ltrim(s) { sub(/^[ \t]+/, "", s); return s }
function rtrim(s) { sub(/[ \t]+$/, "", s); return s }
function trim(s) { return rtrim(ltrim(s)) }
function emit(path, val) {
    if (path == "" || path ~ /[^A-Za-z0-9_.-]/) return
    f = OUT "/" path
    printf "%s", val > f
    close(f)
}
# join the lines of a multi-line flow scalar using YAML folding rules:
# one line break -> space, each empty line -> newline. Lines ending in an
# escaped "\" (double quoted only) are joined without a separator.
function fold(n, arr, dq,    i, r, l, pend, blanks, esc) {
    r = ""; blanks = 0; esc = 0
    for (i = 1; i <= n; i++) {
        l = arr[i]
        if (i > 1) l = ltrim(l)
        if (i < n) l = rtrim(l)
        if (i > 1 && i < n && l == "") { blanks++; continue }
        if (i > 1) {
            if (esc) { esc = 0 }
            else if (blanks > 0) { while (blanks-- > 0) r = r "\n" }
            else r = r " "
            blanks = 0
        }
        if (dq && i < n && match(l, /\\+$/) && RLENGTH % 2 == 1) {
            l = substr(l, 1, length(l) - 1); esc = 1
        }
        r = r l
    }
    return r
}
function unescape_dq(s,    r, i, c, n) {
    r = ""; n = length(s)
    for (i = 1; i <= n; i++) {
        c = substr(s, i, 1)
        if (c != "\\") { r = r c; continue }
        i++; c = substr(s, i, 1)
        if (c == "n") r = r "\n"
        else if (c == "t") r = r "\t"
        else if (c == "r") r = r "\r"
        else if (c == "0") r = r ""
        else if (c == "e") r = r "\033"
        else if (c == "x") { r = r sprintf("%c", hex(substr(s, i + 1, 2))); i += 2 }
        else if (c == "u") { r = r sprintf("%c", hex(substr(s, i + 1, 4))); i += 4 }
        else r = r c      # \\ \" \/ and "\ " (escaped space)
    }
    return r
}
function hex(h,    i, v, d) {
    v = 0; h = tolower(h)
    for (i = 1; i <= length(h); i++) { d = index("0123456789abcdef", substr(h, i, 1)); v = v * 16 + d - 1 }
    return v
}
# position of the closing quote in s (0 if none): single quotes are
# escaped by doubling, double quotes by backslash.
function close_pos(s, q,    i, c, n) {
    n = length(s)
    for (i = 1; i <= n; i++) {
        c = substr(s, i, 1)
        if (q == "\"" && c == "\\") { i++; continue }
        if (c == q) {
            if (q == "'" && substr(s, i + 1, 1) == "'") { i++; continue }
            return i
        }
    }
    return 0
}
function strip_comment(s) { sub(/(^| )#.*$/, "", s); return rtrim(s) }
function finish_quoted(    v) {
    v = fold(qn, qlines, qchar == "\"")
    if (qchar == "'") gsub(/''/, "'", v); else v = unescape_dq(v)
    emit(qpath, v)
    mode = ""
}
function finish_plain(    v) {
    v = fold(qn, qlines, 0)
    if (v != "~" && v != "null") emit(qpath, v)
    mode = ""
}
function finish_block(    v) {
    v = bval
    if (bfold) {  # '>' folding: single newlines between non-indented lines -> space
        v = ""; nn = split(bval, bl, "\n")
        for (i = 1; i <= nn; i++) {
            v = v bl[i]
            if (i < nn) { if (bl[i] != "" && bl[i+1] != "" && bl[i] !~ /^[ \t]/ && bl[i+1] !~ /^[ \t]/) v = v " "; else v = v "\n" }
        }
    }
    if (bchomp == "+") { }
    else {
        sub(/\n+$/, "", v)
        if (bchomp != "-" && v != "") v = v "\n"
    }
    emit(qpath, v)
    mode = ""
}
# start a value (the text after "key:" or "- ") for path; owner = indent of its key/dash
function start_value(path, v, owner,    p, items, n, i, it) {
    v = ltrim(v)
    if (v == "" || v ~ /^#/) return 0
    c = substr(v, 1, 1)
    if (c == "|" || c == ">") {
        mode = "block"; qpath = path; bfold = (c == ">"); bchomp = ""
        if (v ~ /^[|>][-+]/) bchomp = substr(v, 2, 1)
        else if (v ~ /^[|>][0-9][-+]/) bchomp = substr(v, 3, 1)
        bind = -1; bval = ""; bowner = owner
        if (match(v, /[1-9]/) && RSTART <= 3) bind = owner + substr(v, RSTART, 1)
        return 1
    }
    if (c == "'" || c == "\"") {
        qchar = c; qpath = path; qn = 1
        rest = substr(v, 2); p = close_pos(rest, c)
        if (p) { qlines[1] = substr(rest, 1, p - 1); finish_quoted(); return 1 }
        qlines[1] = rest; mode = "quoted"; return 1
    }
    if (c == "[") {   # one-line flow sequence
        v = strip_comment(v); sub(/^\[/, "", v); sub(/\][ \t]*$/, "", v)
        n = split(v, items, ",")
        for (i = 1; i <= n; i++) {
            it = trim(items[i]); if (it == "") continue
            if (it ~ /^'.*'$/) { it = substr(it, 2, length(it) - 2); gsub(/''/, "'", it) }
            else if (it ~ /^".*"$/) it = unescape_dq(substr(it, 2, length(it) - 2))
            emit(path "." sprintf("%03d", idx++), it)
        }
        return 1
    }
    mode = "plain"; qpath = path; qn = 1; qlines[1] = strip_comment(v); powner = owner
    return 1
}
BEGIN { mode = ""; top = ""; idx = 0 }
{
    sub(/\r$/, "")
    line = $0
    if (mode == "block") {
        if (line ~ /^[ \t]*$/) { bval = bval "\n"; next }
        ind = indent_of(line)
        if (bind < 0) { if (ind > bowner) bind = ind; else bind = 999999 }
        if (ind >= bind) { bval = bval substr(line, bind + 1) "\n"; next }
        finish_block()
    }
    if (mode == "quoted") {
        p = close_pos(line, qchar)
        if (p) { qlines[++qn] = substr(line, 1, p - 1); finish_quoted() }
        else qlines[++qn] = line
        next
    }
    if (mode == "plain") {
        if (line ~ /^[ \t]*$/) { qlines[++qn] = ""; next }
        if (indent_of(line) > powner && line !~ /^[ \t]*#/) { qlines[++qn] = strip_comment(line); next }
        while (qn > 1 && qlines[qn] == "") qn--
        finish_plain()
    }
    if (line ~ /^[ \t]*(#.*)?$/ || line ~ /^(---|\.\.\.)/) next
    ind = indent_of(line)
    body = substr(line, ind + 1)
    if (ind == 0 && body !~ /^- /) {
        # top-level "key: value"
        if (!match(body, /^[A-Za-z0-9_.-]+:([ \t]|$)/)) { top = ""; next }
        key = substr(body, 1, index(body, ":") - 1)
        top = key; idx = 0
        start_value(key, substr(body, length(key) + 2), 0)
        next
    }
    if (top == "") next
    if (body ~ /^-( |$)/) {
        path = top "." sprintf("%03d", idx++)
        start_value(path, substr(body, 2), ind)
        next
    }
    if (match(body, /^[A-Za-z0-9_.-]+:([ \t]|$)/)) {
        key = substr(body, 1, index(body, ":") - 1)
        start_value(top "." key, substr(body, length(key) + 2), ind)
    }
}
END {
    if (mode == "block") finish_block()
    else if (mode == "quoted") finish_quoted()
    else if (mode == "plain") { while (qn > 1 && qlines[qn] == "") qn--; finish_plain() }
}
