// Package membership runs the gossip membership agent of a ukai node.
//
// Every node runs one [Agent]. Agents find each other through
// hashicorp/memberlist (SWIM gossip over UDP with TCP push/pull state
// syncs) and each one keeps its own table of every node it has ever seen,
// with that node's last known [NodeMeta] and [State]. Dead and left nodes
// stay in the table (memberlist forgets them after GossipToTheDeadTime)
// until they come back.
//
// The package is organised like memberlist itself:
//
//   - config.go: [Config], [DefaultConfig] and the timing knobs;
//   - meta.go: [NodeMeta], the JSON document each node gossips;
//   - member.go: [Member], [State] and the agent's member table;
//   - event.go: [Event], [EventType] and the non-blocking event queue;
//   - delegate.go: the memberlist delegates (meta, events, merge, alive);
//   - conflict.go: node-name uniqueness ([NameConflictError]);
//   - agent.go: [Agent] and its life cycle (New, Rejoin, SetMeta, Leave,
//     Shutdown);
//   - log.go: memberlist's *log.Logger output adapted into log/slog.
//
// Failure detection: with the defaults of [DefaultConfig] a node that stops
// abruptly (kill -9, power loss) is reported dead by every other node
// within 10 s on a LAN, for clusters up to a few hundred nodes; see the
// SuspicionMult field of [Config] for how the bound scales.
package membership
