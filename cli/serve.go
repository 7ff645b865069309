package cli

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/ukai-storage/ukai/node"
)

func (a *app) serveCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "serve --config FILE",
		Short: "Run the ukai node daemon in the foreground (SIGINT/SIGTERM stop it cleanly, SIGHUP reloads)",
		Long: `Run the ukai node daemon in the foreground.

Configuration comes from, in increasing precedence: built-in defaults, the
YAML file given by --config, UKAI_* environment variables (UKAI_NODE_NAME,
UKAI_NODE_DATA_DIR, UKAI_API_LISTEN, UKAI_ISCSI_LISTEN, UKAI_ISCSI_IQN_PREFIX,
UKAI_METADATA_BACKEND, UKAI_LOG_LEVEL) and the flags below. configs/node.yaml
is an annotated example.

SIGHUP reads the configuration again: log.level and api.metrics_io change
at once; a change to any other setting is logged with the sections it
touches and waits for a restart; a configuration that does not load is refused (logged) and the
node goes on with the one it has. Policies, cordons and drains live in
the metadata store and apply without a reload.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			// SIGHUP is caught from the start: its default action ends
			// the process, and a reload may come while the node starts.
			hup := make(chan os.Signal, 1)
			signal.Notify(hup, syscall.SIGHUP)
			defer signal.Stop(hup)
			path, _ := cmd.Flags().GetString("config")
			cfg, err := node.LoadConfig(path, cmd.Flags())
			if err != nil {
				return err
			}
			level := new(slog.LevelVar)
			log := cfg.LoggerLevel(level)
			cfg.WarnUnsafe(log) // insecure: true, every start
			n, err := node.New(cmd.Context(), cfg, log, a.version)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			go func() {
				for {
					select {
					case <-ctx.Done():
						return
					case <-hup:
						reload(log, level, &cfg, path, cmd, n)
					}
				}
			}()
			if err := n.Run(ctx); err != nil {
				return fmt.Errorf("node %s: %w", cfg.Node.Name, err)
			}
			return nil
		},
	}
	node.Flags(cmd.Flags())
	return cmd
}

// reload is SIGHUP: the configuration read again, the log level and
// api.metrics_io applied, the rest reported.
func reload(log *slog.Logger, level *slog.LevelVar, cur *node.Config, path string, cmd *cobra.Command, n *node.Node) {
	next, err := node.LoadConfig(path, cmd.Flags())
	if err != nil {
		log.Error("reload refused: the configuration does not load; going on with the one in use", "config", path, "err", err)
		return
	}
	if next.Log.Level != cur.Log.Level {
		next.SetLevel(level)
		log.Info("reload: log level changed", "from", cur.Log.Level, "to", next.Log.Level)
		cur.Log.Level = next.Log.Level
	}
	if next.API.MetricsIO != cur.API.MetricsIO {
		n.SetMetricsIO(next.API.MetricsIO)
		log.Info("reload: image I/O counting changed", "api.metrics_io", next.API.MetricsIO)
		cur.API.MetricsIO = next.API.MetricsIO
	}
	if changed := cur.NeedRestart(&next); len(changed) > 0 {
		log.Warn("reload: these settings changed and take effect at the next restart", "sections", changed)
		return
	}
	log.Info("reload: configuration read again", "config", path)
}
