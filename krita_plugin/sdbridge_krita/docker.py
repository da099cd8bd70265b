"""The "sdbridge" docker: widgets bound to a `Model`. Widgets write the artist's choices into
the model and redraw from its signals; they hold no state of their own."""

from __future__ import annotations

import html
from collections.abc import Callable

from krita import DockWidget
from PyQt5.QtCore import QRegExp, QSize, Qt, QTimer
from PyQt5.QtGui import QIcon, QImage, QPixmap, QRegExpValidator
from PyQt5.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QListView,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from sdbridge.editor.control import KINDS
from sdbridge.editor.session import DaemonInfo
from sdbridge.wire.protocol import MAX_CONTROL_STRENGTH, MAX_LORA_WEIGHT

from .model import ControlLayer, Model, qimage

DOCKER_ID = "sdbridge_docker"
PREVIEW_SIZE = 128
MODEL_DEFAULT = "model default"
NO_STYLE = "none"
HISTORY_ICON = 56
COMPACT_BUTTON = 28  # px: a one-character button
AUTOMATIC = "automatic"  # the daemon's first ControlNet for the chosen model
CONTROL_LOOK_MS = 1000  # how often the control rows look for renamed and deleted layers
# Guidance 0 is a real value (few-step models run at 0): "model default" sits one step below.
GUIDANCE_DEFAULT = -0.5


def plus_button(name: str, tooltip: str, action: Callable[[], None]) -> QPushButton:
    """A one-character button, narrow enough for a docker's row."""
    button = QPushButton("+")
    button.setObjectName(name)
    button.setMaximumWidth(COMPACT_BUTTON)
    button.setToolTip(tooltip)
    button.clicked.connect(action)
    return button


class ControlRow(QWidget):
    """One control layer: its name, what kind of layer it is, the ControlNet that reads it and
    how strongly it steers; × stops it steering (the layer stays)."""

    def __init__(self, model: Model, index: int, control: ControlLayer, name: str) -> None:
        super().__init__()
        self.setObjectName(f"sdbridge_control_{index}")
        choice = control.choice
        label = QLabel(name)
        label.setToolTip("Steers every job while the layer is shown; hide it to switch it off")
        self.kind = QComboBox()
        self.kind.setObjectName("sdbridge_control_kind")
        info = model.info
        for preprocessor, text in KINDS.items():
            if info is None or preprocessor in info.preprocessors:
                self.kind.addItem(text, preprocessor)
        self.kind.setCurrentIndex(max(0, self.kind.findData(choice.preprocessor)))
        self.controlnet = QComboBox()
        self.controlnet.setObjectName("sdbridge_control_model")
        self.controlnet.addItems([AUTOMATIC, *(info.controlnets if info else ())])
        self.controlnet.setCurrentText(choice.model or AUTOMATIC)
        self.controlnet.setToolTip("The ControlNet that reads the layer")
        self.strength = QDoubleSpinBox()
        self.strength.setObjectName("sdbridge_control_strength")
        self.strength.setRange(0.0, MAX_CONTROL_STRENGTH)
        self.strength.setSingleStep(0.1)
        self.strength.setValue(choice.strength)
        self.strength.setToolTip("How strongly it steers")
        remove = QPushButton("×")
        remove.setObjectName("sdbridge_control_remove")
        remove.setMaximumWidth(COMPACT_BUTTON)
        remove.setToolTip("Stop steering with this layer (the layer stays)")
        for box in (self.kind, self.controlnet):
            box.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
            box.setMinimumContentsLength(6)
        # Two lines, so that a narrow docker shows every part: the layer and its kind, then
        # the ControlNet and how strongly.
        grid = QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        grid.addWidget(label, 0, 0)
        grid.addWidget(self.kind, 0, 1)
        grid.addWidget(remove, 0, 2)
        grid.addWidget(self.controlnet, 1, 0)
        grid.addWidget(self.strength, 1, 1, 1, 2)
        grid.setColumnStretch(0, 1)
        grid.setColumnStretch(1, 1)
        self.kind.currentIndexChanged.connect(
            lambda i: model.set_control(index, preprocessor=self.kind.itemData(i))
        )
        self.controlnet.currentIndexChanged.connect(
            lambda i: model.set_control(index, model=self.controlnet.itemText(i) if i else "")
        )
        self.strength.valueChanged.connect(lambda v: model.set_control(index, strength=v))
        remove.clicked.connect(lambda: model.remove_control(index))


class SdbridgeDocker(DockWidget):
    def __init__(self) -> None:
        super().__init__()
        self.setWindowTitle("sdbridge")
        self.model = Model()
        # Two parts: what an artist needs at every job (the connection, the prompt, the buttons,
        # the message) always in view, which also makes Krita give the docker that much room;
        # the parameters and the preview below it scroll when the docker is short.
        top = QWidget()
        layout = QVBoxLayout(top)
        layout.setContentsMargins(4, 4, 4, 0)
        layout.setSpacing(4)
        rest = QWidget()
        details = QVBoxLayout(rest)
        details.setContentsMargins(4, 0, 4, 4)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.NoFrame)
        # A narrow docker squeezes the rows (the combo boxes shrink) rather than scrolling.
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        scroll.setWidget(rest)
        root = QWidget()
        column = QVBoxLayout(root)
        column.setContentsMargins(0, 0, 0, 0)
        column.addWidget(top)
        column.addWidget(scroll, 1)
        self.setWidget(root)

        self.connection = QLabel("Connecting …")
        self.connection.setObjectName("sdbridge_connection")
        self.connection.setWordWrap(True)
        self.address = QLineEdit(self.model.address)
        self.address.setObjectName("sdbridge_address")
        self.address.setToolTip("Where `sdbridge serve` listens; remembered for next time")
        reconnect = QPushButton("Connect")
        reconnect.setObjectName("sdbridge_connect")
        self.token = QLineEdit(self.model.token)
        self.token.setObjectName("sdbridge_token")
        self.token.setEchoMode(QLineEdit.Password)
        self.token.setPlaceholderText("token (if required)")
        self.token.setToolTip("Only for a daemon that requires one (listening beyond loopback)")
        address_row = QHBoxLayout()
        address_row.addWidget(self.address, 3)
        address_row.addWidget(self.token, 2)
        address_row.addWidget(reconnect)
        layout.addWidget(self.connection)
        layout.addLayout(address_row)

        self.prompt = QPlainTextEdit()
        self.prompt.setObjectName("sdbridge_prompt")
        self.prompt.setPlaceholderText("Describe what to paint")
        self.prompt.setFixedHeight(56)
        layout.addWidget(self.prompt)

        self.generate = QPushButton("Generate")
        self.generate.setObjectName("sdbridge_generate")
        self.cancel = QPushButton("Cancel")
        self.cancel.setObjectName("sdbridge_cancel")
        self.cancel.setEnabled(False)
        self.live = QCheckBox("Live")
        self.live.setObjectName("sdbridge_live")
        self.live.setEnabled(False)  # until the daemon says it has live mode
        self.live.setToolTip(
            "Live: every change to the canvas is repainted at the Strength below, on a live "
            "layer on top; Apply keeps the live image as a layer"
        )
        buttons = QHBoxLayout()
        buttons.addWidget(self.generate)
        buttons.addWidget(self.cancel)
        buttons.addWidget(self.live)
        layout.addLayout(buttons)
        self.progress = QProgressBar()
        self.progress.setObjectName("sdbridge_progress")
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("Step %v of %m")
        self.progress.setTextVisible(False)
        self.progress.setMaximumHeight(14)
        self.message = QLabel()
        self.message.setObjectName("sdbridge_message")
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextSelectableByMouse)
        layout.addWidget(self.progress)
        layout.addWidget(self.message)

        self.negative = QPlainTextEdit()
        self.negative.setObjectName("sdbridge_negative")
        self.negative.setPlaceholderText("What to avoid (negative prompt)")
        self.negative.setFixedHeight(40)
        details.addWidget(self.negative)

        # Every parameter starts at "model default": the daemon fills in the model's own
        # values, and the ranges come from the daemon's limits once it says hello.
        form = QFormLayout()
        # In a narrow docker a field goes below its label instead of past the docker's edge.
        form.setRowWrapPolicy(QFormLayout.WrapLongRows)
        self.models = QComboBox()
        self.models.setObjectName("sdbridge_model")
        self.steps = QSpinBox()
        self.steps.setObjectName("sdbridge_steps")
        self.steps.setRange(0, 150)
        self.steps.setSpecialValueText(MODEL_DEFAULT)
        self.guidance = QDoubleSpinBox()
        self.guidance.setObjectName("sdbridge_guidance")
        self.guidance.setRange(GUIDANCE_DEFAULT, 30.0)
        self.guidance.setSingleStep(0.5)
        self.guidance.setSpecialValueText(MODEL_DEFAULT)
        self.guidance.setValue(GUIDANCE_DEFAULT)
        self.scheduler = QComboBox()
        self.scheduler.setObjectName("sdbridge_scheduler")
        self.scheduler.addItem(MODEL_DEFAULT)
        self.strength = QSlider(Qt.Horizontal)
        self.strength.setObjectName("sdbridge_strength")
        self.strength.setRange(1, 100)
        self.strength.setValue(round(self.model.strength * 100))
        self.strength.setToolTip("100 %: paint something new; lower: repaint what is there")
        strength_shown = QLabel(f"{self.strength.value()} %")
        strength_shown.setMinimumWidth(40)
        self.strength.valueChanged.connect(lambda value: strength_shown.setText(f"{value} %"))
        strength_row = QHBoxLayout()
        strength_row.addWidget(self.strength, 1)
        strength_row.addWidget(strength_shown)
        self.refine = QDoubleSpinBox()
        self.refine.setObjectName("sdbridge_refine")
        self.refine.setRange(0.0, 1.0)
        self.refine.setSingleStep(0.05)
        self.refine.setSpecialValueText("off")
        self.refine.setToolTip(
            "A second pass for an image larger than the model's own size: it is painted at the "
            "model's size, enlarged, and repainted at this strength (0.2-0.4 keeps the picture)"
        )
        self.style = QComboBox()
        self.style.setObjectName("sdbridge_style")
        self.style.setToolTip("Prompt additions and parameters saved under a name")
        save_style = plus_button(
            "sdbridge_save_style",
            "Save this panel's parameters and negative prompt as a style",
            self._on_save_style,
        )
        style_row = QHBoxLayout()
        style_row.addWidget(self.style, 1)
        style_row.addWidget(save_style)
        self.lora_choice = QComboBox()
        self.lora_choice.setObjectName("sdbridge_lora_choice")
        self.lora_weight = QDoubleSpinBox()
        self.lora_weight.setObjectName("sdbridge_lora_weight")
        self.lora_weight.setRange(-MAX_LORA_WEIGHT, MAX_LORA_WEIGHT)
        self.lora_weight.setSingleStep(0.1)
        self.lora_weight.setValue(1.0)
        add_lora = plus_button(
            "sdbridge_add_lora", "Add this LoRA at this weight to the job", self._on_add_lora
        )
        lora_row = QHBoxLayout()
        lora_row.addWidget(self.lora_choice, 1)
        lora_row.addWidget(self.lora_weight)
        lora_row.addWidget(add_lora)
        self.loras = QListWidget()
        self.loras.setObjectName("sdbridge_loras")
        self.loras.setMaximumHeight(60)
        self.loras.hide()  # until the artist adds one
        self.loras.setToolTip("The job's LoRAs; double-click one to remove it")
        self.loras.itemDoubleClicked.connect(self._on_remove_lora)
        new_control = QPushButton("New layer")
        new_control.setObjectName("sdbridge_new_control")
        new_control.setToolTip("A layer on top to scribble on: the picture goes where you draw")
        use_layer = QPushButton("Use layer")
        use_layer.setObjectName("sdbridge_use_layer")
        use_layer.setToolTip("The active layer (a sketch, line art, a photo) steers the jobs")
        new_control.clicked.connect(self.model.add_control_layer)
        use_layer.clicked.connect(self.model.use_active_layer)
        control_row = QHBoxLayout()
        control_row.addWidget(new_control)
        control_row.addWidget(use_layer)
        self.controls = QWidget()
        self.controls.setObjectName("sdbridge_controls")
        QVBoxLayout(self.controls).setContentsMargins(0, 0, 0, 0)
        self.controls.hide()  # until the artist adds one
        self._shown_controls: list[tuple[int, str]] = []
        self._controls_timer = QTimer(self)
        self._controls_timer.setInterval(CONTROL_LOOK_MS)
        self._controls_timer.timeout.connect(self._look_at_controls)
        self.images = QSpinBox()
        self.images.setObjectName("sdbridge_images")
        self.images.setRange(1, 8)
        self.images.setToolTip("Several images become one layer each, in a group")
        self.fixed_seed = QCheckBox("fixed")
        self.seed = QLineEdit("0")
        self.seed.setValidator(QRegExpValidator(QRegExp("[0-9]{1,10}")))
        self.seed.setEnabled(False)
        self.reuse_seed = QPushButton("last")
        self.reuse_seed.setEnabled(False)
        self.reuse_seed.setToolTip("Fix the seed of the last result, to vary it with the prompt")
        seed_row = QHBoxLayout()
        seed_row.addWidget(self.fixed_seed)
        seed_row.addWidget(self.seed, 1)
        seed_row.addWidget(self.reuse_seed)
        form.addRow("Style", style_row)
        form.addRow("Model", self.models)
        form.addRow("LoRA", lora_row)
        form.addRow("", self.loras)
        form.addRow("Control", control_row)
        form.addRow(self.controls)
        form.addRow("Steps", self.steps)
        form.addRow("Guidance", self.guidance)
        form.addRow("Sampler", self.scheduler)
        form.addRow("Strength", strength_row)
        form.addRow("Refine", self.refine)
        form.addRow("Images", self.images)
        form.addRow("Seed", seed_row)
        for box in (self.style, self.models, self.lora_choice, self.scheduler):
            # Sized to a few letters, not to the longest name (the list shows them whole).
            box.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
            box.setMinimumContentsLength(6)
        details.addLayout(form)

        self.preview = QLabel()
        self.preview.setObjectName("sdbridge_preview")
        self.preview.setAlignment(Qt.AlignCenter)
        self.preview.setMinimumHeight(PREVIEW_SIZE)
        details.addWidget(self.preview)

        # Every image of this Krita session, then the artist's earlier ones from the daemon:
        # click to see it on the canvas, then Apply it.
        self.history = QListWidget()
        self.history.setObjectName("sdbridge_history")
        self.history.setViewMode(QListView.IconMode)
        self.history.setIconSize(QSize(HISTORY_ICON, HISTORY_ICON))
        self.history.setFlow(QListView.LeftToRight)
        self.history.setWrapping(False)
        self.history.setFixedHeight(HISTORY_ICON + 28)
        self.history.setToolTip(
            "This session's images, then your earlier ones from the daemon; "
            "click one to see it on the canvas"
        )
        self.apply = QPushButton("Apply")
        self.apply.setObjectName("sdbridge_apply")
        self.apply.setToolTip(
            "Add the picked image as a layer where it was painted "
            "(an earlier session's: at the top left)"
        )
        self.use_settings = QPushButton("Use settings")
        self.use_settings.setObjectName("sdbridge_use_settings")
        self.use_settings.setToolTip("Load its prompt, seed and parameters into the panel")
        history_buttons = QHBoxLayout()
        history_buttons.addWidget(self.apply)
        history_buttons.addWidget(self.use_settings)
        details.addWidget(QLabel("History"))
        details.addWidget(self.history)
        details.addLayout(history_buttons)
        details.addStretch(1)

        self._bind(reconnect)

    def _bind(self, reconnect: QPushButton) -> None:
        m = self.model

        def apply_address() -> None:
            m.set_address(self.address.text(), self.token.text())

        self.address.returnPressed.connect(apply_address)
        self.token.returnPressed.connect(apply_address)
        reconnect.clicked.connect(apply_address)
        self.prompt.textChanged.connect(lambda: setattr(m, "prompt", self.prompt.toPlainText()))
        self.negative.textChanged.connect(
            lambda: setattr(m, "negative_prompt", self.negative.toPlainText())
        )
        self.models.currentTextChanged.connect(self._on_model_picked)
        self.steps.valueChanged.connect(lambda value: setattr(m, "steps", value or None))
        self.guidance.valueChanged.connect(
            lambda value: setattr(m, "guidance_scale", None if value < 0 else value)
        )
        self.scheduler.currentIndexChanged.connect(
            lambda _index: setattr(m, "scheduler", self._chosen_scheduler())
        )
        self.strength.valueChanged.connect(lambda value: setattr(m, "strength", value / 100))
        self.images.valueChanged.connect(lambda value: setattr(m, "num_images", value))
        self.refine.valueChanged.connect(lambda value: setattr(m, "refine_strength", value or None))
        self.style.currentIndexChanged.connect(
            lambda index: setattr(m, "style", self.style.itemText(index) if index > 0 else "")
        )
        self.fixed_seed.toggled.connect(self._on_fixed_seed)
        self.seed.textChanged.connect(lambda text: setattr(m, "seed", int(text or 0)))
        self.reuse_seed.clicked.connect(self._on_reuse_seed)
        self.generate.clicked.connect(lambda: m.apply_live() if m.live else m.generate())
        self.cancel.clicked.connect(m.cancel)
        self.live.toggled.connect(m.set_live)

        m.connection_changed.connect(self._on_connection)
        m.info_changed.connect(self._on_info)
        m.running_changed.connect(self._on_running)
        m.progress_changed.connect(self._on_progress)
        m.preview_changed.connect(self._on_preview)
        m.message_changed.connect(self._on_message)
        m.last_seed_changed.connect(lambda _seed: self.reuse_seed.setEnabled(True))
        m.styles_changed.connect(self._on_styles)
        m.history_changed.connect(self._on_history)
        m.settings_loaded.connect(self._on_settings_loaded)
        m.live_changed.connect(self._on_live)
        m.controls_changed.connect(self._show_controls)
        self.history.itemClicked.connect(lambda item: m.show_item(item.data(Qt.UserRole)))
        self.apply.clicked.connect(lambda: self._with_picked(m.apply_item))
        self.use_settings.clicked.connect(lambda: self._with_picked(m.use_item_settings))
        m.load_styles()

    def canvasChanged(self, canvas) -> None:  # noqa: N802 (Krita's name)
        """Jobs read the active document when Generate is pressed; the control rows name its
        layers."""
        self._show_controls()

    def _show_controls(self) -> None:
        layout = self.controls.layout()
        while layout.count():
            layout.takeAt(0).widget().deleteLater()
        shown = self.model.shown_controls()
        for index, control, name in shown:
            layout.addWidget(ControlRow(self.model, index, control, name))
        self.controls.setVisible(bool(shown))
        self._shown_controls = [(index, name) for index, _, name in shown]
        if self.model.controls:
            self._controls_timer.start()
        else:
            self._controls_timer.stop()

    def _look_at_controls(self) -> None:
        """Krita tells a plugin of no renamed or deleted layer: the rows follow within a second."""
        now = [(index, name) for index, _, name in self.model.shown_controls()]
        if now != self._shown_controls:
            self._show_controls()

    def _on_fixed_seed(self, fixed: bool) -> None:
        self.model.fixed_seed = fixed
        self.seed.setEnabled(fixed)

    def _on_reuse_seed(self) -> None:
        self.model.reuse_last_seed()
        self.fixed_seed.setChecked(True)
        self.seed.setText(str(self.model.seed))

    def _on_connection(self, connected: bool, message: str, detail: str) -> None:
        colour = "#3a3" if connected else "#c33"
        dot = f"<span style='color:{colour}'>●</span>"
        self.connection.setText(f"{dot} {html.escape(message)}")  # rich text: escape the rest
        self.connection.setToolTip(detail)

    def _with_picked(self, action: Callable[[int], None]) -> None:
        item = self.history.currentItem()
        if item is not None:
            action(item.data(Qt.UserRole))

    def _on_history(self) -> None:
        self.history.clear()
        for entry in self.model.history:
            icon = QPixmap.fromImage(qimage(dict(entry.image))).scaled(
                HISTORY_ICON, HISTORY_ICON, Qt.KeepAspectRatio, Qt.SmoothTransformation
            )
            item = QListWidgetItem(QIcon(icon), "")
            item.setData(Qt.UserRole, entry.number)
            item.setToolTip(entry.parameters)
            self.history.addItem(item)
        self.history.setCurrentRow(0)

    def _on_settings_loaded(self) -> None:
        """The model's choices changed (Use settings): every widget shows them again."""
        m = self.model
        self.prompt.setPlainText(m.prompt)
        self.negative.setPlainText(m.negative_prompt)
        self.models.setCurrentText(m.model_name)
        self.steps.setValue(m.steps or 0)
        self.guidance.setValue(GUIDANCE_DEFAULT if m.guidance_scale is None else m.guidance_scale)
        self.scheduler.setCurrentText(m.scheduler or MODEL_DEFAULT)
        self.strength.setValue(round(m.strength * 100))
        self.refine.setValue(m.refine_strength or 0.0)
        self.fixed_seed.setChecked(m.fixed_seed)
        self.seed.setText(str(m.seed))
        self._show_loras()

    def _on_styles(self, names: list, chosen: str) -> None:
        self.style.blockSignals(True)
        self.style.clear()
        self.style.addItems([NO_STYLE, *names])
        self.style.setCurrentText(chosen or NO_STYLE)
        self.style.blockSignals(False)

    def _on_save_style(self) -> None:
        name, ok = QInputDialog.getText(self, "Save style", "Name of the style:")
        if not ok or not name.strip():
            return
        prompt, ok = QInputDialog.getText(
            self,
            "Save style",
            "Prompt additions ({prompt} stands for your prompt):",
            text="{prompt}, ",
        )
        if ok:
            self.model.save_style(name, prompt)

    def _on_add_lora(self) -> None:
        if self.lora_choice.currentText():
            self.model.add_lora(self.lora_choice.currentText(), self.lora_weight.value())
            self._show_loras()

    def _on_remove_lora(self, item: QListWidgetItem) -> None:
        self.model.remove_lora(item.data(Qt.UserRole))
        self._show_loras()

    def _show_loras(self) -> None:
        self.loras.clear()
        for lora in self.model.loras:
            item = QListWidgetItem(f"{lora.name}  ({lora.weight:g})")
            item.setData(Qt.UserRole, lora.name)
            self.loras.addItem(item)
        self.loras.setVisible(bool(self.model.loras))

    def _on_info(self, info: DaemonInfo) -> None:
        """The daemon's models, samplers and limits: the widgets' choices and ranges."""
        self.models.blockSignals(True)
        self.models.clear()
        self.models.addItems(info.models)
        self.models.setCurrentText(self.model.model_name)
        self.models.blockSignals(False)
        chosen = self.scheduler.currentText()
        self.scheduler.blockSignals(True)
        self.scheduler.clear()
        self.scheduler.addItems([MODEL_DEFAULT, *info.schedulers])
        self.scheduler.setCurrentText(chosen if chosen in info.schedulers else MODEL_DEFAULT)
        self.scheduler.blockSignals(False)
        self.model.scheduler = self._chosen_scheduler()
        self.steps.setMaximum(info.limits.max_steps)
        self.images.setMaximum(info.limits.max_images)
        self.lora_choice.clear()
        self.lora_choice.addItems(info.loras)
        self.live.setEnabled("live" in info.capabilities)
        self._show_loras()
        self._show_controls()
        self._show_defaults()

    def _chosen_scheduler(self) -> str | None:
        return self.scheduler.currentText() if self.scheduler.currentIndex() > 0 else None

    def _on_model_picked(self, name: str) -> None:
        self.model.model_name = name
        self._show_defaults()

    def _show_defaults(self) -> None:
        """What "model default" means for the chosen model, on hover."""
        info = self.model.info
        defaults = info.defaults_for(self.model.model_name) if info else None
        text = f"{MODEL_DEFAULT}: {defaults.describe()}" if defaults else MODEL_DEFAULT
        for widget in (self.steps, self.guidance, self.scheduler):
            widget.setToolTip(text)

    def _on_running(self, running: bool) -> None:
        self.generate.setEnabled(not running)
        self.cancel.setEnabled(running)

    def _on_live(self, live: bool) -> None:
        """While live, Generate is Apply: the live image becomes a layer."""
        self.live.blockSignals(True)
        self.live.setChecked(live)
        self.live.blockSignals(False)
        self.generate.setText("Apply" if live else "Generate")

    def _on_progress(self, step: int, total: int) -> None:
        self.progress.setTextVisible(total > 0)
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(step)

    def _on_preview(self, image: QImage) -> None:
        pixmap = QPixmap.fromImage(image).scaled(
            PREVIEW_SIZE, PREVIEW_SIZE, Qt.KeepAspectRatio, Qt.SmoothTransformation
        )
        self.preview.setPixmap(pixmap)

    def _on_message(self, text: str, is_error: bool) -> None:
        self.message.setStyleSheet("color: #c33" if is_error else "")
        self.message.setText(text)
