package cli

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/ukai-storage/ukai/node"
)

func (a *app) serveCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "serve --config FILE",
		Short: "Run the ukai node daemon in the foreground (SIGINT/SIGTERM stop it cleanly)",
		Long: `Run the ukai node daemon in the foreground.

Configuration comes from, in increasing precedence: built-in defaults, the
YAML file given by --config, UKAI_* environment variables (UKAI_NODE_NAME,
UKAI_NODE_DATA_DIR, UKAI_API_LISTEN, UKAI_ISCSI_LISTEN, UKAI_ISCSI_IQN_PREFIX,
UKAI_METADATA_BACKEND, UKAI_LOG_LEVEL) and the flags below. configs/node.yaml
is an annotated example.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			path, _ := cmd.Flags().GetString("config")
			cfg, err := node.LoadConfig(path, cmd.Flags())
			if err != nil {
				return err
			}
			log := cfg.Logger()
			cfg.WarnUnsafe(log) // insecure: true, every start
			n, err := node.New(cmd.Context(), cfg, log, a.version)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			if err := n.Run(ctx); err != nil {
				return fmt.Errorf("node %s: %w", cfg.Node.Name, err)
			}
			return nil
		},
	}
	node.Flags(cmd.Flags())
	return cmd
}
