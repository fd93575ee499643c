# Copyright (c) mmcbn contributors. All rights reserved.
"""The documentation cannot drift from the repository.

* Every relative link (and ``#anchor``) in README.md and docs/**/*.md points
  at a file (and heading) that exists, and every path of a script, tool,
  test, config or result those pages name (``python benchmarks/...``,
  ``bash tools/dist_train.sh ...``) exists.
* The option table of docs/user_guides/configs_and_options.md lists exactly
  the constructor arguments of ``CBN2d`` and ``SyncCBN``, with their
  defaults.

Each test reports every problem at once, by file and line. Fast: no mmcv,
no model, only text and two signatures.
"""
import ast
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTIONS_PAGE = ROOT / 'docs' / 'user_guides' / 'configs_and_options.md'
OPTIONS_HEADER = ['name', 'default', 'what it does', 'when to change it']
# constructor arguments every torch module factory takes; not CBN options
NOT_OPTIONS = {'self', 'device', 'dtype'}


def doc_files():
    return [ROOT / 'README.md'] + sorted((ROOT / 'docs').rglob('*.md'))


def rel(path):
    path = path.resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) \
        else str(path)


def prose_lines(text):
    """(line number, line) outside fenced code blocks."""
    fence = None
    for no, line in enumerate(text.split('\n'), 1):
        stripped = line.lstrip()
        marker = re.match(r'(`{3,}|~{3,})', stripped)
        if marker:
            if fence is None:
                fence = marker.group(1)[0]
            elif marker.group(1)[0] == fence:
                fence = None
            continue
        if fence is None:
            yield no, line


def strip_code_spans(line):
    return re.sub(r'(`+)(.+?)\1', '', line)


def slug(heading):
    """GitHub's anchor for a heading text."""
    text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)  # links
    text = re.sub(r'<[^>]+>', '', text)                        # html tags
    text = text.replace('`', '').strip().lower()
    text = re.sub(r'[^\w\- ]', '', text)
    return text.replace(' ', '-')


def anchors(path, _cache={}):
    if path not in _cache:
        found, seen = set(), {}
        for _, line in prose_lines(path.read_text(encoding='utf-8')):
            m = re.match(r' {0,3}#{1,6}\s+(.*?)\s*#*\s*$', line)
            if not m:
                continue
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f'{base}-{n}')
        for _, line in prose_lines(path.read_text(encoding='utf-8')):
            for name in re.findall(r'<a\s+(?:name|id)="([^"]+)"', line):
                found.add(name)
        _cache[path] = found
    return _cache[path]


LINK = re.compile(r'!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?'
                  r'(?:\s+"[^"]*")?\s*\)')


def link_problems(path):
    problems = []
    for no, line in prose_lines(path.read_text(encoding='utf-8')):
        for target in LINK.findall(strip_code_spans(line)):
            if re.match(r'[a-z][a-z0-9+.-]*:', target, re.I):
                continue  # http:, https:, mailto:
            file_part, _, anchor = target.partition('#')
            dest = path if not file_part else (path.parent / file_part)
            where = f'{rel(path)}:{no}: [{target}]'
            if not dest.exists():
                problems.append(f'{where}: no such file {rel(dest)}')
                continue
            if anchor and dest.suffix == '.md' and \
                    anchor not in anchors(dest.resolve()):
                problems.append(f'{where}: no heading #{anchor} in '
                                f'{rel(dest.resolve())}')
    return problems


# a path in the repository, as a command or a file name: python
# benchmarks/x.py, bash tools/dist_train.sh, tools/train.py, tests/x.py,
# configs/demo/x.py, benchmarks/results/x.json (link targets are checked
# as links, relative to their page). Not preceded by a path
# character (mmdet's .../.mim/tools/... is not ours), no glob or {a,b}.
REPO_PATH = re.compile(
    r'(?<![\w./$-])((?:benchmarks|tools|tests|configs|mmcbn|docs)/'
    r'[\w./-]*\.(?:py|sh|cpp|json|png))(?![\w{*])')


def command_problems(path):
    problems = []
    text = path.read_text(encoding='utf-8')
    for no, line in enumerate(text.split('\n'), 1):
        line = re.sub(r'\]\([^)]*\)', '](...)', line)  # link targets: above
        for name in REPO_PATH.findall(line):
            if not (ROOT / name).is_file():
                problems.append(f'{rel(path)}:{no}: `{name}` does not exist')
    return problems


def test_doc_pages_exist():
    assert (ROOT / 'docs' / 'get_started.md').is_file()
    assert OPTIONS_PAGE.is_file()
    assert len(doc_files()) > 10


def test_slug_is_githubs():
    assert slug('The demo (`make demo`)') == 'the-demo-make-demo'
    assert slug('Checkpoints on torch >= 2.6') == 'checkpoints-on-torch--26'
    assert slug('SyncCBN: across GPUs and iterations') == \
        'synccbn-across-gpus-and-iterations'
    assert slug('Where BN does fail: crops of real photographs') == \
        'where-bn-does-fail-crops-of-real-photographs'


def test_every_relative_link_resolves():
    problems = [p for f in doc_files() for p in link_problems(f)]
    assert not problems, 'broken links:\n' + '\n'.join(problems)


def test_every_named_script_and_file_exists():
    problems = [p for f in doc_files() for p in command_problems(f)]
    assert not problems, 'named files that do not exist:\n' + \
        '\n'.join(problems)


def test_link_checker_catches_what_it_should(tmp_path):
    """The checkers themselves: a bad file, a bad anchor, a missing script."""
    (tmp_path / 'other.md').write_text('# Other\n\n## Setup (`make`)\n')
    page = tmp_path / 'page.md'
    page.write_text('# Probe\n\n[ok](#probe) [bad](#nope) [gone](nowhere.md)\n'
                    '[ok](other.md#setup-make) [x](https://example.com)\n'
                    '[bad](other.md#setup)\n'
                    '```\n[in code](nowhere.md)\npython tools/nope.py\n```\n'
                    'run `python benchmarks/train_speed.py` and '
                    '`bash tools/no_such.sh`, not `[code](nowhere.md)`\n',
                    encoding='utf-8')
    links = link_problems(page)
    commands = command_problems(page)
    assert len(links) == 3, links
    assert any(':3:' in p and '#nope' in p for p in links)
    assert any(':3:' in p and 'nowhere.md' in p for p in links)
    assert any(':5:' in p and 'other.md#setup]' in p for p in links)
    assert sorted(p.split('`')[1] for p in commands) == \
        ['tools/no_such.sh', 'tools/nope.py']


def split_row(line):
    cells, buf, ticks = [], '', False
    body = line.strip()
    body = body[1:] if body.startswith('|') else body
    body = body[:-1] if body.endswith('|') else body
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == '\\' and i + 1 < len(body) and body[i + 1] == '|':
            buf += '|'
            i += 2
            continue
        if ch == '`':
            ticks = not ticks
        if ch == '|' and not ticks:
            cells.append(buf.strip())
            buf = ''
        else:
            buf += ch
        i += 1
    cells.append(buf.strip())
    return cells


def option_table():
    """{name: (line number, default cell)} of the one options table."""
    tables = []
    for f in doc_files():
        lines = f.read_text(encoding='utf-8').split('\n')
        for no, line in enumerate(lines, 1):
            if line.startswith('|') and \
                    [c.lower() for c in split_row(line)] == OPTIONS_HEADER:
                tables.append((f, no, lines))
    assert len(tables) == 1, (
        'expected exactly one table with the columns '
        f'{OPTIONS_HEADER}, found: '
        + ', '.join(f'{rel(f)}:{no}' for f, no, _ in tables))
    f, no, lines = tables[0]
    assert f == OPTIONS_PAGE, \
        f'the options table belongs in {rel(OPTIONS_PAGE)}'
    rows, problems = {}, []
    for i in range(no + 1, len(lines)):  # skip the --- row
        line = lines[i]
        if not line.startswith('|'):
            break
        cells = split_row(line)
        if set(''.join(cells)) <= set('-: '):
            continue
        if len(cells) != len(OPTIONS_HEADER):
            problems.append(f'{rel(f)}:{i + 1}: {len(cells)} cells')
            continue
        m = re.fullmatch(r'`(\w+)`', cells[0])
        if not m:
            problems.append(f'{rel(f)}:{i + 1}: name {cells[0]!r} is not '
                            'one `identifier`')
            continue
        if m.group(1) in rows:
            problems.append(f'{rel(f)}:{i + 1}: {m.group(1)} twice')
        rows[m.group(1)] = (i + 1, cells[1])
    return rows, problems


def signature_options():
    """{name: default} over CBN2d and SyncCBN (inspect.Parameter.empty if
    required); SyncCBN passes *args/**kwargs on to CBN2d."""
    import mmcbn
    options = {}
    for cls in (mmcbn.CBN2d, mmcbn.SyncCBN):
        for p in inspect.signature(cls.__init__).parameters.values():
            if p.name in NOT_OPTIONS or p.kind in (p.VAR_POSITIONAL,
                                                   p.VAR_KEYWORD):
                continue
            if p.name in options and options[p.name] is not p.default \
                    and options[p.name] != p.default:
                raise AssertionError(
                    f'{p.name}: CBN2d and SyncCBN disagree on the default')
            options[p.name] = p.default
    return options


def documented_default(cell):
    """The first `code span` of the cell as a Python literal; None if the
    cell says the argument is required."""
    m = re.search(r'`([^`]+)`', cell)
    if m is None:
        if cell.strip().lower().startswith('required'):
            return inspect.Parameter.empty
        raise ValueError(f'no `literal` in {cell!r}')
    return ast.literal_eval(m.group(1))


def test_option_table_matches_the_signatures():
    rows, problems = option_table()
    options = signature_options()
    page = rel(OPTIONS_PAGE)
    for name in sorted(set(options) - set(rows)):
        default = options[name]
        shown = 'required' if default is inspect.Parameter.empty \
            else f'`{default!r}`'
        problems.append(f'{page}: missing row for `{name}` '
                        f'(default {shown})')
    for name in sorted(set(rows) - set(options)):
        problems.append(f'{page}:{rows[name][0]}: `{name}` is not an '
                        'argument of CBN2d or SyncCBN')
    for name in sorted(set(rows) & set(options)):
        no, cell = rows[name]
        try:
            documented = documented_default(cell)
        except (ValueError, SyntaxError) as err:
            problems.append(f'{page}:{no}: `{name}` default {cell!r} is not '
                            f'a Python literal ({err})')
            continue
        actual = options[name]
        same = (documented is actual) or (
            actual is not inspect.Parameter.empty
            and documented is not inspect.Parameter.empty
            and type(documented) is type(actual) and documented == actual)
        if not same:
            problems.append(f'{page}:{no}: `{name}` documented default '
                            f'{cell!r}, signature default {actual!r}')
    assert not problems, 'option table vs signatures:\n' + '\n'.join(problems)


@pytest.mark.parametrize('cell, value', [('`1e-5`', 1e-05), ('`None`', None),
                                         ("`'batch'`", 'batch'),
                                         ('required', inspect.Parameter.empty),
                                         ('`8` (iterations)', 8)])
def test_documented_default_parses(cell, value):
    assert documented_default(cell) == value
