"""The `needs` graph of a project: cycles and the order actions run in. Pure; no recursion, so
a chain of thousands of actions is fine."""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def cycles(graph: Mapping[str, Iterable[str]], first_only: bool) -> list[list[str]]:
    """Cycles found by one depth-first pass (one per distinct set of actions), without recursion."""
    done: set[str] = set()
    found: list[list[str]] = []
    seen_sets: set[frozenset] = set()
    for root in graph:
        if root in done:
            continue
        path, position = [root], {root: 0}
        stack = [iter(graph[root])]
        while stack:
            for child in stack[-1]:
                if child in position:  # a back edge: child is on the current path
                    cycle = path[position[child] :] + [child]
                    if frozenset(cycle) not in seen_sets:
                        seen_sets.add(frozenset(cycle))
                        found.append(cycle)
                        if first_only:
                            return found
                elif child not in done and child in graph:
                    position[child] = len(path)
                    path.append(child)
                    stack.append(iter(graph[child]))
                    break
            else:
                stack.pop()
                done.add(path[-1])
                del position[path.pop()]
    return found


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A cycle in a `needs` graph as a closed path (e.g. ["a", "b", "a"]), or None."""
    found = cycles(graph, first_only=True)
    return found[0] if found else None


def topological_order(graph: Mapping[str, Iterable[str]], targets: Iterable[str]) -> list[str]:
    """`targets` and everything they need, dependencies first; ValueError naming any cycle."""
    order: list[str] = []
    done: set[str] = set()
    for target in targets:
        if target in done:
            continue
        path, on_path = [target], {target}
        stack = [iter(graph.get(target, ()))]
        while stack:
            for child in stack[-1]:
                if child in on_path:
                    cycle = path[path.index(child) :] + [child]
                    raise ValueError(f"needs form a cycle: {' -> '.join(cycle)}")
                if child not in done:
                    path.append(child)
                    on_path.add(child)
                    stack.append(iter(graph.get(child, ())))
                    break
            else:
                stack.pop()
                node = path.pop()
                on_path.discard(node)
                done.add(node)
                order.append(node)
    return order
